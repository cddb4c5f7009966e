"""Kafka for every service, one job per module: `security` (TLS or plaintext settings),
`producer`, `admin` (topics), `decode` (record -> event or `Rejected`), `pipeline` (handler
dispatch, retries, DLQ), `consumers` (`EventConsumer` with the inbox, `PlainEventConsumer`) and
`ranges` (an offset range read without a group). Import from those modules."""
