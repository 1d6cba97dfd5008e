-- Per-appointment facts the usage report is computed from. Keyed by the opaque
-- appointment key; department and environment are the only descriptive columns.
CREATE TABLE appointment_facts (
    appointment_key text        PRIMARY KEY,
    tenant_id       text        NOT NULL,
    integration_id  uuid        NOT NULL,
    environment     text        NOT NULL,
    department      text        NOT NULL,
    scheduled_start timestamptz NOT NULL,
    scheduled_end   timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX appointment_facts_tenant_start ON appointment_facts (tenant_id, scheduled_start);
