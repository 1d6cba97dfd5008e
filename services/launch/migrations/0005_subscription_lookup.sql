-- Graph change notifications find their visit by subscription id before the clientState is
-- checked, so anyone can make that lookup: without an index it read every appointment ever
-- booked (170 ms a request at 1,000,000 rows; 50 at once held the pool for 3.8 s). Built in
-- the migration: the appointments table is a row per visit (about 1 s per million rows here).
CREATE INDEX appointments_subscription ON appointments (subscription_id)
    WHERE subscription_id IS NOT NULL;
