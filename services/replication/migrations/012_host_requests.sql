-- A point's verification or export asked of the recovery host that keeps the item's replica
-- (the replication service keeps no block copy of the item: services/replication/host_points.py).
-- The API request waits for the host's answer here; any instance's consumer records it.
CREATE TABLE host_requests (
    request_id  uuid PRIMARY KEY,
    command_id  uuid NOT NULL UNIQUE,   -- the command sent; its CommandCompleted names it
    item_id     uuid NOT NULL,
    agent_id    uuid NOT NULL,
    cycle_seq   integer NOT NULL,
    kind        text NOT NULL,          -- verify | export
    created_at  timestamptz NOT NULL DEFAULT now(),
    answered_at timestamptz,
    answer      jsonb,                  -- the host's result
    error       text                    -- the host's failure
);
CREATE INDEX host_requests_created ON host_requests (created_at);
