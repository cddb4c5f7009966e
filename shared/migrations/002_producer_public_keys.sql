-- Edge producers sign events with Ed25519: the read model keeps each producer's public key,
-- which verifies and cannot sign. The HMAC keys kept before could sign as the producer: they
-- are dropped, and a producer registered before has no key (its events are refused with the
-- reason `no_public_key`) until it is re-registered.
ALTER TABLE known_producers ADD COLUMN public_key text;
ALTER TABLE known_producers DROP COLUMN verification_key;
