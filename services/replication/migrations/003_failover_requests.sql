-- Requests of the failover service (failover.events.v1) and the answer given to each: a
-- repeated request id re-publishes the recorded answer and does nothing else. Long file work
-- (materialising disks, seeding a reverse replica) runs outside any transaction while the row
-- is 'pending'; the answer is recorded and enqueued in the outbox in one transaction.
CREATE TABLE failover_requests (
    request_id   uuid PRIMARY KEY,
    kind         text NOT NULL,            -- 'materialise' | 'reverse'
    vault_id     uuid NOT NULL,
    item_id      uuid NOT NULL,            -- the item materialised / the NEW item of a reverse
    request      jsonb NOT NULL,
    state        text NOT NULL,            -- 'pending' | 'answered' | 'failed'
    answer_type  text,
    answer       jsonb,
    attempts     integer NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now(),
    answered_at  timestamptz
);
CREATE INDEX failover_requests_pending ON failover_requests (created_at) WHERE state = 'pending';
