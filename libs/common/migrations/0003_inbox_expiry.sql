-- The housekeeper (libs/common/housekeeping.py) deletes inbox rows older than the dedupe
-- retention, oldest first; without this index each hourly sweep would read the whole table,
-- 30 days of events times the service's consumers. Built in the migration's transaction: on
-- an existing installation the consumers wait for it (Kafka holds their records meanwhile),
-- while HTTP requests, which never write the inbox, do not.
CREATE INDEX inbox_processed_at ON inbox (processed_at);
