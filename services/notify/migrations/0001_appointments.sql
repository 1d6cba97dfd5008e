-- What notify knows of each appointment: enough to schedule its messages, nothing about
-- the patient. The encrypted phone number arrives with the SMS work (later migration).
CREATE TABLE appointments (
    appointment_key  text        PRIMARY KEY,
    tenant_id        text        NOT NULL,
    integration_id   uuid        NOT NULL,
    starts_at        timestamptz NOT NULL,
    ends_at          timestamptz NOT NULL,
    time_zone        text        NOT NULL,
    sms_enabled      boolean     NOT NULL,
    schedule_version integer     NOT NULL,
    confirmation     text        NOT NULL DEFAULT 'pending'
        CHECK (confirmation IN ('pending', 'sent', 'skipped', 'failed')),
    received_at      timestamptz NOT NULL DEFAULT now()
);
