-- An integration is one FHIR base URL of one Microsoft 365 tenant.
CREATE TABLE integrations (
    id            uuid        PRIMARY KEY,
    tenant_id     text        NOT NULL,
    fhir_base_url text        NOT NULL,
    environment   text        NOT NULL CHECK (environment IN ('test', 'production')),
    enabled       boolean     NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, fhir_base_url)
);
