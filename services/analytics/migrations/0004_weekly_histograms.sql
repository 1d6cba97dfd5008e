-- The daily histograms summed per ISO week (Monday), same dimensions and buckets. A report
-- grouped by department, environment or integration reads whole weeks from here and only the
-- days at either end of its range from daily_histograms: a 90-day range is 12 or 13 weeks
-- and at most 12 days instead of 90 days, each with hundreds of bucket rows per department.
CREATE TABLE weekly_histograms (
    tenant_id      text     NOT NULL,
    week           date     NOT NULL CHECK (extract(isodow FROM week) = 1),
    environment    text     NOT NULL,
    department     text     NOT NULL,
    integration_id uuid     NOT NULL,
    figure         text     NOT NULL CHECK (figure IN ('lobby_wait', 'duration')),
    bucket         smallint NOT NULL,
    visits         int      NOT NULL,
    PRIMARY KEY (tenant_id, week, environment, department, integration_id, figure, bucket)
);
INSERT INTO weekly_histograms
SELECT tenant_id, day - (extract(isodow FROM day)::int - 1), environment, department, integration_id,
    figure, bucket, sum(visits)
FROM daily_histograms
GROUP BY 1, 2, 3, 4, 5, 6, 7
HAVING sum(visits) <> 0;
