"""Test support: the local stack's addresses, fresh databases and topic prefixes, services and
edge processes started as real processes, deadline polling."""
