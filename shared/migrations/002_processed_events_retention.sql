-- De-duplication rows and published outbox rows are pruned after a retention period
-- (DR_PROCESSED_EVENTS_RETENTION_HOURS): indexes for the pruning queries.
CREATE INDEX IF NOT EXISTS processed_events_at ON processed_events (processed_at);
CREATE INDEX IF NOT EXISTS outbox_published_at ON outbox (published_at) WHERE published_at IS NOT NULL;
