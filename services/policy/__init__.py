"""Policy service: replication policies, cloud pairings, network mappings and the
enable-replication prerequisite checks."""
