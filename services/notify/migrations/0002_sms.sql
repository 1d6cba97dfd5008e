-- The SMS work. A patient's number is kept only as the event's field ciphertext, and only
-- until the appointment ends (purge.py); opt-outs keep a keyed hash, never the number.
ALTER TABLE appointments
    ADD COLUMN join_url        text,
    ADD COLUMN phone_encrypted text,
    -- false while only a reschedule or cancel has arrived (topics are not ordered together)
    ADD COLUMN booked          boolean NOT NULL DEFAULT true,
    ADD COLUMN cancelled       boolean NOT NULL DEFAULT false,
    ADD COLUMN phone_purged_at timestamptz;
CREATE INDEX appointments_phone_held ON appointments (ends_at) WHERE phone_encrypted IS NOT NULL;

-- Projection of the compacted integration-config topic: the highest config_version wins.
CREATE TABLE integrations (
    integration_id           uuid        PRIMARY KEY,
    config_version           integer     NOT NULL,
    deleted                  boolean     NOT NULL,
    organisation_name        text        NOT NULL,
    sms_enabled              boolean     NOT NULL,
    sms_from_number          text,
    reminder_offsets_minutes integer[]   NOT NULL,
    sms_templates            jsonb       NOT NULL,
    updated_at               timestamptz NOT NULL DEFAULT now()
);

-- One row per message owed. due_at is when a dispatcher may next take it: the planned time,
-- then a retry time or the end of a claim's lease, so one partial index serves them all.
CREATE TABLE sms_messages (
    id                       bigserial   PRIMARY KEY,
    appointment_key          text        NOT NULL,
    kind                     text        NOT NULL
        CHECK (kind IN ('confirmation', 'reschedule', 'cancellation', 'reminder', 'link')),
    schedule_version         integer     NOT NULL,
    -- the reminder offset in minutes, or the request's event id for on-demand links
    discriminator            text        NOT NULL DEFAULT '',
    send_at                  timestamptz NOT NULL,
    due_at                   timestamptz NOT NULL,
    status                   text        NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'sent', 'refused', 'failed', 'cancelled', 'superseded')),
    outcome                  text,
    reason                   text,
    claims                   integer     NOT NULL DEFAULT 0,
    attempts                 integer     NOT NULL DEFAULT 0,
    repeatability_request_id uuid        NOT NULL,
    repeatability_first_sent timestamptz,
    sender                   text,
    provider_message_id      text,
    segments                 integer,
    finished_at              timestamptz,
    created_at               timestamptz NOT NULL DEFAULT now(),
    UNIQUE (appointment_key, kind, schedule_version, discriminator)
);
CREATE INDEX sms_messages_due ON sms_messages (due_at) WHERE status = 'pending';
CREATE INDEX sms_messages_provider_id ON sms_messages (provider_message_id)
    WHERE provider_message_id IS NOT NULL;

-- Wakes the dispatchers when something is owed now, instead of on their next poll.
CREATE FUNCTION sms_messages_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sms_due_' || TG_TABLE_SCHEMA, '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER sms_messages_inserted AFTER INSERT ON sms_messages
    FOR EACH STATEMENT EXECUTE FUNCTION sms_messages_notify();

-- Sends per sending number in the last minute, shared by every replica (rate limit).
CREATE TABLE sender_sends (
    sender  text        NOT NULL,
    sent_at timestamptz NOT NULL
);
CREATE INDEX sender_sends_window ON sender_sends (sender, sent_at);

-- Messages given up on after the last attempt, with the reason, for operators.
CREATE TABLE dead_letters (
    id              bigserial   PRIMARY KEY,
    sms_message_id  bigint      NOT NULL REFERENCES sms_messages (id),
    appointment_key text        NOT NULL,
    kind            text        NOT NULL,
    attempts        integer     NOT NULL,
    reason          text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- STOP / START per (our sending number, keyed hash of the recipient).
CREATE TABLE opt_outs (
    sender         text        NOT NULL,
    recipient_hash text        NOT NULL,
    opted_out      boolean     NOT NULL,
    changed_at     timestamptz NOT NULL,
    PRIMARY KEY (sender, recipient_hash)
);

-- Delivery status per provider message id; a report may arrive before the send commits.
CREATE TABLE delivery_reports (
    provider_message_id text        PRIMARY KEY,
    delivery_status     text        NOT NULL,
    details             text        NOT NULL,
    received_at         timestamptz NOT NULL,
    event_id            text        NOT NULL
);
