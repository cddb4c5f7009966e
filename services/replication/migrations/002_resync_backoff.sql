-- Resync retries with backoff (docs/reference.md: 1, 2, 4, 8, 10 min, then every 30 min).
ALTER TABLE protected_items ADD COLUMN resync_attempts integer NOT NULL DEFAULT 0;
ALTER TABLE protected_items ADD COLUMN resync_not_before timestamptz;
