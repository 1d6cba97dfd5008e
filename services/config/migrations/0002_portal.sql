-- The admin portal's configuration: integrations (one per FHIR base URL), tenant-wide
-- settings (SMS consent, allocation), phone numbers with their provisioning jobs, audit.

-- One sequence for every published config version: monotonic across all keys, so a consumer
-- keeping "the highest version seen" per key never goes backwards after a restart.
CREATE SEQUENCE config_version_seq;

CREATE TABLE phone_numbers (
    id                   uuid        PRIMARY KEY,
    tenant_id            text        NOT NULL,
    e164                 text        UNIQUE CHECK (e164 ~ '^\+[1-9][0-9]{6,14}$'),
    status               text        NOT NULL
                         CHECK (status IN ('searching', 'purchasing', 'active', 'failed')),
    -- The job's next step; 'done' once the number is ours or the job failed.
    step                 text        NOT NULL
                         CHECK (step IN ('search', 'search_poll', 'purchase', 'purchase_poll',
                                         'confirm', 'done')),
    search_operation_url text,
    search_id            text,
    candidate_e164       text,
    purchase_operation_url text,
    error                text,
    attempts             integer     NOT NULL DEFAULT 0,
    next_attempt_at      timestamptz NOT NULL DEFAULT now(),
    created_by_oid       text        NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX phone_numbers_tenant ON phone_numbers (tenant_id, created_at);
CREATE INDEX phone_numbers_due ON phone_numbers (next_attempt_at) WHERE step <> 'done';

ALTER TABLE integrations
    ADD COLUMN smart_client_id         text    NOT NULL DEFAULT '',
    ADD COLUMN client_auth_method      text    NOT NULL DEFAULT 'client_secret_basic'
               CHECK (client_auth_method IN ('client_secret_basic', 'private_key_jwt')),
    ADD COLUMN client_secret_encrypted text,
    ADD COLUMN private_key_encrypted   text,
    ADD COLUMN pkce_mode               text    NOT NULL DEFAULT 'required'
               CHECK (pkce_mode IN ('required', 'if_supported', 'off')),
    ADD COLUMN teams_organizer_id      text    NOT NULL DEFAULT '',
    ADD COLUMN department              text    NOT NULL DEFAULT '',
    ADD COLUMN organisation_name       text    NOT NULL DEFAULT '',
    ADD COLUMN smart_configuration     jsonb,
    ADD COLUMN smart_checked_at        timestamptz,
    ADD COLUMN phone_number_id         uuid    REFERENCES phone_numbers (id),
    ADD COLUMN config_version          bigint  NOT NULL DEFAULT 0;
CREATE INDEX integrations_tenant ON integrations (tenant_id, created_at);
CREATE INDEX integrations_phone_number ON integrations (phone_number_id);

CREATE TABLE tenant_settings (
    tenant_id                   text        PRIMARY KEY,
    sms_enabled                 boolean     NOT NULL DEFAULT false,
    -- (a) the vendor may send SMS to patients for the organisation
    sms_vendor_consent_by       text,
    sms_vendor_consent_at       timestamptz,
    -- (b) the organisation confirms it has the patients' consent
    sms_patient_consent_by      text,
    sms_patient_consent_at      timestamptz,
    monthly_allocation          integer     CHECK (monthly_allocation >= 0),
    allocation_config_version   bigint      NOT NULL DEFAULT 0,
    updated_at                  timestamptz NOT NULL DEFAULT now(),
    -- SMS on without both consents cannot be stored, whatever the code path.
    CHECK (NOT sms_enabled OR (sms_vendor_consent_at IS NOT NULL
                               AND sms_patient_consent_at IS NOT NULL))
);

CREATE TABLE audit_log (
    id           bigserial   PRIMARY KEY,
    tenant_id    text        NOT NULL,
    at           timestamptz NOT NULL DEFAULT now(),
    actor_oid    text        NOT NULL,
    actor_upn    text        NOT NULL,
    action       text        NOT NULL,
    entity_type  text        NOT NULL,
    entity_id    text        NOT NULL,
    before       jsonb,
    after        jsonb
);
CREATE INDEX audit_log_tenant ON audit_log (tenant_id, id DESC);
