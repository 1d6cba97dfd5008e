-- Which pending messages may be at ACS already: a reschedule leaves those to go (and announces
-- the move after them), and replans the others. "Has a claim and a lease ahead" also held for
-- messages put off by the rate limit, retried after ACS refused them (429, 5xx) or waiting for
-- their configuration, so a visit moved meanwhile got its old confirmation and a notice.
--
-- in_flight_since: set when a send's slot is reserved (the text goes to ACS next); cleared when
-- ACS answers without taking it (a retry after 429 or 5xx); left set when no answer came (a
-- timeout, a crash), since the message may then be at ACS, until its outcome is recorded. A
-- message that never had a slot (deferred by the rate limit, waiting) never has it.
ALTER TABLE sms_messages ADD COLUMN in_flight_since timestamptz;

-- reserve_sms_slots as in 0003, the reserved messages marked in flight.
CREATE OR REPLACE FUNCTION reserve_sms_slots(
    p_ids bigint[],
    p_claims integer[],
    p_senders text[],
    p_recipient_hashes text[],
    p_at timestamptz,
    p_limit integer,
    p_window interval,
    p_reason text
) RETURNS TABLE (
    reserved_id bigint,
    reserved_first_sent timestamptz,
    reserved_attempts integer,
    verdict text
) LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    -- Every number of the claim, in one order (by the lock key itself, once per key: two
    -- numbers may share a hashtext, and ordering by number would then lock that key out of
    -- order), so two dispatchers locking overlapping sets cannot deadlock. The key is the one
    -- earlier versions lock one number at a time, so old and new replicas still exclude each
    -- other during a rollout.
    PERFORM pg_advisory_xact_lock(k)
    FROM (
        SELECT DISTINCT hashtext('sms-rate:' || s) AS k FROM unnest(p_senders) AS u(s)
        ORDER BY k OFFSET 0
    ) AS ordered;
    -- A query of its own: each query of a volatile function takes a new snapshot, so this
    -- one sees the sends committed before the locks were granted.
    RETURN QUERY
    WITH asked AS (
        SELECT a.id, a.claims, a.sender, a.n, coalesce(o.opted_out, false) AS opted_out
        FROM unnest(p_ids, p_claims, p_senders, p_recipient_hashes) WITH ORDINALITY
            AS a(id, claims, sender, who, n)
        JOIN sms_messages m ON m.id = a.id AND m.claims = a.claims AND m.status = 'pending'
        LEFT JOIN opt_outs o ON o.sender = a.sender AND o.recipient_hash = a.who
    ), windows AS (
        -- The window as one row per number: the count and the oldest send (a busy number
        -- has up to p_limit sends in it).
        SELECT s.sender, w.sent, w.oldest
        FROM (SELECT DISTINCT asked.sender FROM asked WHERE NOT asked.opted_out) AS s
        CROSS JOIN LATERAL (
            SELECT count(*) AS sent, min(x.sent_at) AS oldest FROM (
                SELECT ss.sent_at FROM sender_sends ss
                WHERE ss.sender = s.sender AND ss.sent_at > p_at - p_window
                ORDER BY ss.sent_at LIMIT p_limit
            ) AS x
        ) AS w
    ), ranked AS (
        SELECT a.id, a.claims, a.sender, w.oldest,
               w.sent + row_number() OVER (PARTITION BY a.sender ORDER BY a.n) <= p_limit
                   AS free
        FROM asked a JOIN windows w ON w.sender = a.sender
        WHERE NOT a.opted_out
    ), recorded AS (
        UPDATE sms_messages m SET attempts = m.attempts + 1, sender = r.sender,
            repeatability_first_sent = coalesce(m.repeatability_first_sent, p_at),
            in_flight_since = coalesce(m.in_flight_since, p_at)
        FROM ranked r
        WHERE m.id = r.id AND m.claims = r.claims AND m.status = 'pending' AND r.free
        RETURNING m.id, m.sender, m.repeatability_first_sent, m.attempts
    ), counted AS (
        INSERT INTO sender_sends (sender, sent_at) SELECT recorded.sender, p_at FROM recorded
    ), deferred AS (
        UPDATE sms_messages m SET due_at = coalesce(r.oldest, p_at) + p_window,
            reason = p_reason
        FROM ranked r
        WHERE m.id = r.id AND m.claims = r.claims AND m.status = 'pending' AND NOT r.free
        RETURNING m.id
    )
    SELECT g.id, r.repeatability_first_sent, r.attempts,
           CASE WHEN r.id IS NOT NULL THEN 'reserved'
                WHEN d.id IS NOT NULL THEN 'deferred'
                WHEN a.opted_out THEN 'opted_out'
                ELSE 'lost' END
    FROM unnest(p_ids) AS g(id)
    LEFT JOIN recorded r ON r.id = g.id
    LEFT JOIN deferred d ON d.id = g.id
    LEFT JOIN asked a ON a.id = g.id;
END;
$$;
