-- Rows the broker refused for good (larger than it accepts, corrupt) are set aside with the
-- reason instead of rolling back every batch they are in: the relay skips them, the parked
-- rows gauge and its alert show them, and an operator re-queues (parked_at = NULL) or deletes
-- them. The sweep never deletes one (published_at stays NULL).
ALTER TABLE outbox ADD COLUMN parked_at timestamptz, ADD COLUMN parked_reason text;
CREATE INDEX outbox_parked ON outbox (id) WHERE parked_at IS NOT NULL;
