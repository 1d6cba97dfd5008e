-- A send whose answer was lost (a crash, a timeout) is learnt by its retry, with the same
-- repeatabilityRequestId; but a cancel, a move, a STOP or SMS switched off may come first: the
-- message is finished unsent (a cancel, a move) or refused by its retry before any send (a STOP,
-- SMS off), so no retry learns the answer, and the patient's SMS would never be recorded nor
-- announced. A send's tag now names its message (`notify:<kind>:<repeatability request id>`,
-- services/notify/acs.py), and its delivery report records such a send as sent, once, with its
-- sms-sent event, from whichever comes second: the report (services/notify/webhooks.py) or what
-- finishes the message (services/notify/lost_sends.py).
--
-- The messages a report may find by its tag: marked in flight (sent, perhaps at ACS) and without
-- an outcome (pending, or finished unsent since). A recorded send has its outcome and leaves the
-- index, so it holds the sends not yet answered and the few lost ones, not the table. No new
-- status: such a send is recorded 'sent' as the dispatcher's late answer records it.
CREATE INDEX sms_messages_unrecorded_sends ON sms_messages (repeatability_request_id)
    WHERE in_flight_since IS NOT NULL AND outcome IS NULL;

-- A report's tag, kept with it (NULL: no tag of ours): the message's repeatabilityRequestId and
-- kind, the number it came from and the segments its attempts carried, so that what finishes a
-- message in flight later finds the report that came first.
ALTER TABLE delivery_reports
    ADD COLUMN repeatability_request_id uuid,
    ADD COLUMN kind                     text,
    ADD COLUMN sender                   text,
    ADD COLUMN segments                 integer;
CREATE INDEX delivery_reports_by_tag ON delivery_reports (repeatability_request_id)
    WHERE repeatability_request_id IS NOT NULL;
