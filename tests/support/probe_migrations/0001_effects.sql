-- Deliberately no unique key: a duplicate effect would show up as a second row, so only the
-- inbox stands between a redelivery and a double count.
CREATE TABLE effects (
    event_id        uuid        NOT NULL,
    appointment_key text        NOT NULL,
    applied_at      timestamptz NOT NULL DEFAULT now()
);
