-- Teams meetings are prepared after booking (services/launch/meeting_preparation.py), not
-- while the EHR's scheduling webhook waits: a booked appointment may have no meeting yet.
-- A failed preparation is retried with a growing delay instead of on every worker round.
ALTER TABLE appointments
    ADD COLUMN meeting_attempts integer     NOT NULL DEFAULT 0,
    ADD COLUMN meeting_retry_at timestamptz;
CREATE INDEX appointments_meeting_pending ON appointments (starts_at)
    WHERE meeting_id IS NULL AND status = 'booked';
