"""Common package of the platform's services: event envelope and schemas, Kafka producer and
consumer with dead-letter queues, the transactional outbox, auth, metrics, logging, settings."""
