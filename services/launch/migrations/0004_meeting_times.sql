-- A reschedule moves the visit's Teams meeting in Graph (PATCH startDateTime/endDateTime),
-- not while the EHR's scheduling webhook waits: the reschedule's UPDATE marks a visit whose
-- meeting is made (meeting_times_stale), and the meeting worker (meeting_preparation.py)
-- PATCHes it, clearing the mark only if the schedule version it sent is still the row's.
-- meeting_move_retry_at is a claim's lease while a PATCH is in flight, then the backoff of
-- a failed one (meeting_move_attempts).
ALTER TABLE appointments
    ADD COLUMN meeting_times_stale   boolean     NOT NULL DEFAULT false,
    ADD COLUMN meeting_move_attempts integer     NOT NULL DEFAULT 0,
    ADD COLUMN meeting_move_retry_at timestamptz;
CREATE INDEX appointments_meeting_times_stale ON appointments (starts_at)
    WHERE meeting_times_stale;
