-- The recovery point a materialise request was given (chosen by the worker: `latest`,
-- `latest_app_consistent` or the one named). While the request is unanswered ('pending' or
-- 'delegated'), retention keeps that point and the one the request names (a pin); once it is
-- answered, the next retention pass may prune it as usual.
ALTER TABLE failover_requests ADD COLUMN point_seq integer;
CREATE INDEX failover_requests_open ON failover_requests (item_id)
    WHERE state IN ('pending', 'delegated');
