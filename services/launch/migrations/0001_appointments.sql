-- One row per video-visit appointment the gateway knows. No patient data: the FHIR
-- Appointment id is kept only as the keyed appointment_key.
CREATE TABLE appointments (
    appointment_key text        PRIMARY KEY,
    tenant_id       text        NOT NULL,
    integration_id  uuid        NOT NULL,
    environment     text        NOT NULL CHECK (environment IN ('test', 'production')),
    department      text        NOT NULL,
    starts_at       timestamptz NOT NULL,
    ends_at         timestamptz NOT NULL,
    time_zone       text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (ends_at > starts_at)
);
CREATE INDEX appointments_tenant_start ON appointments (tenant_id, starts_at);
