-- Visits were filed under their UTC day: a 19:30 visit in Chicago on 31 January counted on
-- 1 February, and against February's allocation. A fact now keeps its booking's time zone and
-- is filed under its local day (facts.py).
ALTER TABLE appointment_facts ADD COLUMN time_zone text;

-- The zones of past bookings were not kept: they stay unknown (NULL), and such visits are
-- filed in the service's report time zone (report_time_zone, handed to the migration by
-- settings.migration_parameters; Chicago, the default, when run without it), as facts.py
-- files any visit whose zone is unknown. A booking that arrives again, or a reschedule, brings
-- its own zone. One UPDATE: each row gets one new version.
UPDATE appointment_facts
SET report_day = (coalesce(report_at, scheduled_start) AT TIME ZONE
    coalesce(nullif(current_setting('ehr.report_time_zone', true), ''), 'America/Chicago'))::date
WHERE coalesce(report_at, scheduled_start) IS NOT NULL;

-- The rollup aggregated again from the refiled facts, as rollup.rebuild does per tenant. The
-- bucket thresholds are histogram.py's (1 s, then x1.05 rounded, up to 48 h), computed with
-- the same float arithmetic.
DELETE FROM daily_usage;
INSERT INTO daily_usage
SELECT tenant_id, report_day, environment, department, integration_id,
    count(*) FILTER (WHERE visit),
    count(*) FILTER (WHERE status = 'completed'),
    count(*) FILTER (WHERE status = 'no_show'),
    coalesce(sum(sms_sent), 0),
    count(lobby_wait_ms) FILTER (WHERE visit),
    coalesce(sum(lobby_wait_ms) FILTER (WHERE visit), 0),
    count(duration_ms) FILTER (WHERE visit),
    coalesce(sum(duration_ms) FILTER (WHERE visit), 0)
FROM appointment_facts, LATERAL (SELECT status IN ('completed', 'no_show') AS visit) AS v
WHERE (visit OR sms_sent <> 0) AND report_day IS NOT NULL
    AND environment IS NOT NULL AND department IS NOT NULL AND integration_id IS NOT NULL
GROUP BY 1, 2, 3, 4, 5;

DELETE FROM daily_histogram_counts;
DELETE FROM weekly_histogram_counts;
DELETE FROM tenant_day_histogram_counts;
WITH RECURSIVE thresholds(ms) AS (
    SELECT 1000::bigint
    UNION ALL
    SELECT greatest(ms + 1, round(ms::float8 * 1.05::float8)::bigint) FROM thresholds
    WHERE ms < 48 * 3600 * 1000
), expected AS (
    SELECT tenant_id, report_day AS day, environment, department, integration_id, figure,
        width_bucket(value, (SELECT array_agg(ms ORDER BY ms) FROM thresholds))::smallint
            AS bucket,
        count(*) AS visits
    FROM appointment_facts,
        LATERAL (VALUES ('lobby_wait', lobby_wait_ms), ('duration', duration_ms))
            AS v(figure, value)
    WHERE status IN ('completed', 'no_show') AND report_day IS NOT NULL AND value IS NOT NULL
        AND environment IS NOT NULL AND department IS NOT NULL AND integration_id IS NOT NULL
    GROUP BY 1, 2, 3, 4, 5, 6, 7
), daily AS (
    INSERT INTO daily_histogram_counts
    SELECT tenant_id, day, environment, department, integration_id, figure,
        histogram_counts(array_agg(bucket), array_agg(visits))
    FROM expected GROUP BY 1, 2, 3, 4, 5, 6
), weekly AS (
    INSERT INTO weekly_histogram_counts
    SELECT tenant_id, day - (extract(isodow FROM day)::int - 1), environment, department,
        integration_id, figure, histogram_counts(array_agg(bucket), array_agg(visits))
    FROM expected GROUP BY 1, 2, 3, 4, 5, 6
)
INSERT INTO tenant_day_histogram_counts
SELECT tenant_id, day, figure, histogram_counts(array_agg(bucket), array_agg(visits))
FROM expected GROUP BY 1, 2, 3;
