-- Each registration of an edge may carry a Kafka client certificate issued from its CSR: the
-- principal it maps to (its ACLs are this service's to create and delete), the serial and the
-- expiry. A revoked producer keeps when and why (a later registration clears both).
ALTER TABLE producers ADD COLUMN kafka_principal text;
ALTER TABLE producers ADD COLUMN certificate_serial text;
ALTER TABLE producers ADD COLUMN certificate_not_after timestamptz;
ALTER TABLE producers ADD COLUMN revoked_at timestamptz;
ALTER TABLE producers ADD COLUMN revoked_reason text;
