-- Meeting events may arrive before appointment-created, so a fact row starts with only the
-- tenant and gains its department, environment and integration when the booking arrives.
ALTER TABLE appointment_facts
    ALTER COLUMN integration_id  DROP NOT NULL,
    ALTER COLUMN environment     DROP NOT NULL,
    ALTER COLUMN department      DROP NOT NULL,
    ALTER COLUMN scheduled_start DROP NOT NULL,
    ALTER COLUMN scheduled_end   DROP NOT NULL,
    ADD COLUMN schedule_version int         NOT NULL DEFAULT 0,
    ADD COLUMN cancelled_at     timestamptz,
    ADD COLUMN cancel_reason    text,
    ADD COLUMN meeting_ended_at timestamptz,
    -- Figures recomputed from the observations below in the transaction of every event.
    ADD COLUMN status           text        NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'completed', 'no_show', 'not_a_visit')),
    ADD COLUMN started_at       timestamptz,
    ADD COLUMN report_at        timestamptz,
    ADD COLUMN report_day       date,
    ADD COLUMN duration_ms      bigint,
    ADD COLUMN lobby_wait_ms    bigint,
    ADD COLUMN attendees        int         NOT NULL DEFAULT 0,
    ADD COLUMN sms_sent         int         NOT NULL DEFAULT 0;

CREATE INDEX appointment_facts_visits ON appointment_facts (tenant_id, report_at DESC, appointment_key)
    WHERE status IN ('completed', 'no_show');

-- Raw observations, keyed by what they say, so that applying an event again inserts nothing.
CREATE TABLE lobby_entries (
    appointment_key text        NOT NULL,
    participant     text        NOT NULL,
    entered_at      timestamptz NOT NULL,
    PRIMARY KEY (appointment_key, participant, entered_at)
);
CREATE TABLE admissions (
    appointment_key text        NOT NULL,
    participant     text        NOT NULL,
    admitted_at     timestamptz NOT NULL,
    PRIMARY KEY (appointment_key, participant, admitted_at)
);
CREATE TABLE presence_changes (
    appointment_key text        NOT NULL,
    participant     text        NOT NULL,
    at              timestamptz NOT NULL,
    joined          boolean     NOT NULL,
    PRIMARY KEY (appointment_key, participant, at, joined)
);
CREATE TABLE participant_roles (
    appointment_key text NOT NULL,
    participant     text NOT NULL,
    role            text NOT NULL,
    PRIMARY KEY (appointment_key, participant)
);
CREATE TABLE sms_messages (
    event_id        uuid        PRIMARY KEY,
    appointment_key text        NOT NULL,
    kind            text        NOT NULL,
    outcome         text        NOT NULL,
    segments        int         NOT NULL,
    at              timestamptz NOT NULL
);
CREATE INDEX sms_messages_appointment ON sms_messages (appointment_key);

-- Daily rollup per tenant, day (UTC day of the visit's start), environment, department and
-- integration; maintained in the fact's transaction by subtracting the visit's previous
-- contribution and adding its new one.
CREATE TABLE daily_usage (
    tenant_id          text   NOT NULL,
    day                date   NOT NULL,
    environment        text   NOT NULL,
    department         text   NOT NULL,
    integration_id     uuid   NOT NULL,
    visits             int    NOT NULL DEFAULT 0,
    completed          int    NOT NULL DEFAULT 0,
    no_show            int    NOT NULL DEFAULT 0,
    sms_sent           bigint NOT NULL DEFAULT 0,
    lobby_wait_count   int    NOT NULL DEFAULT 0,
    lobby_wait_sum_ms  bigint NOT NULL DEFAULT 0,
    duration_count     int    NOT NULL DEFAULT 0,
    duration_sum_ms    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, day, environment, department, integration_id)
);
-- Per-day value histograms (fine fixed buckets, see histogram.py) for median and p90.
CREATE TABLE daily_histograms (
    tenant_id      text     NOT NULL,
    day            date     NOT NULL,
    environment    text     NOT NULL,
    department     text     NOT NULL,
    integration_id uuid     NOT NULL,
    figure         text     NOT NULL CHECK (figure IN ('lobby_wait', 'duration')),
    bucket         smallint NOT NULL,
    visits         int      NOT NULL,
    PRIMARY KEY (tenant_id, day, environment, department, integration_id, figure, bucket)
);

-- The monthly allocation of completed appointments, from the config service.
CREATE TABLE tenant_allocations (
    tenant_id          text        PRIMARY KEY,
    monthly_allocation int         NOT NULL CHECK (monthly_allocation >= 0),
    config_version     int         NOT NULL,
    updated_at         timestamptz NOT NULL DEFAULT now()
);
