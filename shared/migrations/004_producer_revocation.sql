-- A revoked producer's public key verifies nothing: its events are dead-lettered with the
-- revocation's time and reason (a later registration, with a new key, clears both).
ALTER TABLE known_producers ADD COLUMN IF NOT EXISTS revoked_at timestamptz;
ALTER TABLE known_producers ADD COLUMN IF NOT EXISTS revoked_reason text;
