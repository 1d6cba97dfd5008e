-- The same histograms with the dimensions summed away: a per-day report reads ~250 rows a
-- day from here instead of every department's and integration's buckets.
CREATE TABLE tenant_day_histograms (
    tenant_id text     NOT NULL,
    day       date     NOT NULL,
    figure    text     NOT NULL CHECK (figure IN ('lobby_wait', 'duration')),
    bucket    smallint NOT NULL,
    visits    int      NOT NULL,
    PRIMARY KEY (tenant_id, day, figure, bucket)
);
