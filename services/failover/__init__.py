"""Failover service: test/planned/unplanned failover, cleanup, commit, reverse replication,
failback, recovery plans and jobs, as durable workflows."""
