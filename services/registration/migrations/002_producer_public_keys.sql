-- Edge producers sign events with Ed25519 and register their public key; the HMAC keys kept
-- before could sign as the producer and are dropped. A producer registered before has no key:
-- its events are refused (reason `no_public_key`) until it is re-registered (force), which
-- its edge process does on start when it finds its old identity file.
ALTER TABLE producers ADD COLUMN public_key text;
ALTER TABLE producers DROP COLUMN verification_key;
