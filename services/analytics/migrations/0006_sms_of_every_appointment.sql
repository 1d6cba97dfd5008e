-- The SMS sent for an appointment that never became a visit (cancelled, not yet held, nobody
-- from staff came) now reach daily_usage too, filed under the day the appointment was booked
-- for (rollup.contribution). Those facts get that report day, and their SMS are added to the
-- rollup; visits and their rows are unchanged.
UPDATE appointment_facts SET report_day = (scheduled_start AT TIME ZONE 'UTC')::date
WHERE report_at IS NULL AND scheduled_start IS NOT NULL;

INSERT INTO daily_usage AS u (tenant_id, day, environment, department, integration_id, sms_sent)
SELECT tenant_id, report_day, environment, department, integration_id, sum(sms_sent)
FROM appointment_facts
WHERE status NOT IN ('completed', 'no_show') AND sms_sent <> 0 AND report_day IS NOT NULL
    AND environment IS NOT NULL AND department IS NOT NULL AND integration_id IS NOT NULL
GROUP BY 1, 2, 3, 4, 5
ON CONFLICT (tenant_id, day, environment, department, integration_id)
    DO UPDATE SET sms_sent = u.sms_sent + excluded.sms_sent;
