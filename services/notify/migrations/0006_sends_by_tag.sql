-- A send whose answer was lost (a crash, a timeout) is learnt by its retry, with the same
-- repeatabilityRequestId; but a cancel or a move meanwhile finished the message unsent
-- ('cancelled', 'superseded', no outcome), so no retry came, and the patient's SMS was never
-- recorded nor announced. A send's tag now names its message (`notify:<kind>:<repeatability
-- request id>`, services/notify/acs.py), and its delivery report records such a send as sent,
-- once, with its sms-sent event (services/notify/webhooks.py).
--
-- The messages a report may find by its tag: marked in flight (sent, perhaps at ACS) and without
-- an outcome (pending, or finished unsent since). A recorded send has its outcome and leaves the
-- index, so it holds the sends not yet answered and the few lost ones, not the table. No new
-- status: such a send is recorded 'sent' as the dispatcher's late answer records it.
CREATE INDEX sms_messages_unrecorded_sends ON sms_messages (repeatability_request_id)
    WHERE in_flight_since IS NOT NULL AND outcome IS NULL;
