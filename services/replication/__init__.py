"""Replication service: protected items, the change-block delta pipeline, the replica store,
verifiable recovery points, retention, resync, RPO and health."""
