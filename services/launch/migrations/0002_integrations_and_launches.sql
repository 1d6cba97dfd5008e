-- The gateway's own copy of each integration, projected from the compacted
-- integration-config topic. Secrets stay ciphertext, decrypted only to call the EHR.
CREATE TABLE integrations (
    integration_id          uuid        PRIMARY KEY,
    config_version          integer     NOT NULL,
    tenant_id               text        NOT NULL,
    deleted                 boolean     NOT NULL,
    enabled                 boolean     NOT NULL,
    fhir_base_url           text        NOT NULL,
    environment             text        NOT NULL,
    department              text        NOT NULL,
    organisation_name       text        NOT NULL,
    ms_tenant_id            text        NOT NULL,
    smart_client_id         text        NOT NULL,
    client_auth_method      text        NOT NULL,
    client_secret_encrypted text,
    private_key_encrypted   text,
    pkce_mode               text        NOT NULL,
    teams_organizer_id      text        NOT NULL,
    sms_enabled             boolean     NOT NULL,
    updated_at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX integrations_fhir_base ON integrations (fhir_base_url) WHERE enabled AND NOT deleted;

-- A SMART launch between the redirect to authorize and the callback. Single use.
CREATE TABLE launch_states (
    state_hash     bytea       PRIMARY KEY,
    integration_id uuid        NOT NULL,
    secrets        text        NOT NULL,  -- ciphertext: PKCE verifier and nonce
    expires_at     timestamptz NOT NULL
);

-- The clinician after the launch: the EHR user id (fhirUser) is all we keep about them.
CREATE TABLE provider_sessions (
    token_hash      bytea       PRIMARY KEY,
    integration_id  uuid        NOT NULL,
    ehr_user_id     text        NOT NULL,
    appointment_key text,
    candidates      text,       -- ciphertext: appointment ids to choose from, when several
    smart_tokens    text        NOT NULL,  -- ciphertext: access and refresh token
    csrf_token      text        NOT NULL,
    expires_at      timestamptz NOT NULL
);

ALTER TABLE appointments
    ADD COLUMN status                  text        NOT NULL DEFAULT 'booked'
        CHECK (status IN ('booked', 'cancelled')),
    ADD COLUMN schedule_version        integer     NOT NULL DEFAULT 1,
    ADD COLUMN ehr_user_id             text,
    ADD COLUMN organizer_id            text,
    ADD COLUMN meeting_id              text,
    ADD COLUMN join_web_url            text,
    ADD COLUMN patient_join_url        text,
    ADD COLUMN subscription_id         text,
    ADD COLUMN subscription_expires_at timestamptz,
    ADD COLUMN client_state_hash       bytea,
    ADD COLUMN meeting_ended_at        timestamptz,
    ADD COLUMN updated_at              timestamptz NOT NULL DEFAULT now();
CREATE UNIQUE INDEX appointments_meeting ON appointments (meeting_id) WHERE meeting_id IS NOT NULL;
CREATE INDEX appointments_subscription_due ON appointments (subscription_expires_at)
    WHERE subscription_id IS NOT NULL AND meeting_ended_at IS NULL;

-- Scheduling-feed deliveries already applied (the EHR retries; event_id is its idempotency key).
CREATE TABLE scheduling_deliveries (
    event_id    uuid        PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now()
);

-- Live roster: one row per call leg, keyed by a pseudonym of the leg, never a name.
CREATE TABLE roster (
    appointment_key  text        NOT NULL,
    participant      text        NOT NULL,
    role             text        NOT NULL,
    state            text        NOT NULL CHECK (state IN ('lobby', 'admitted', 'left')),
    lobby_entered_at timestamptz,
    admitted_at      timestamptz,
    joined_at        timestamptz,
    left_at          timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (appointment_key, participant)
);

-- Graph change notifications already applied (Graph retries and may repeat them).
CREATE TABLE graph_notifications (
    digest      bytea       PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now()
);

-- Patients who opened the join link: first lobby entry per device pseudonym.
CREATE TABLE lobby_arrivals (
    appointment_key text        NOT NULL,
    participant     text        NOT NULL,
    arrived_at      timestamptz NOT NULL,
    PRIMARY KEY (appointment_key, participant)
);

-- Roster changes wake every replica's open provider pages (SSE), whichever replica got them.
CREATE FUNCTION roster_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('roster_' || TG_TABLE_SCHEMA, NEW.appointment_key);
    RETURN NULL;
END;
$$;
CREATE TRIGGER roster_changed AFTER INSERT OR UPDATE ON roster
    FOR EACH ROW EXECUTE FUNCTION roster_notify();
