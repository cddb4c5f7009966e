"""`make demo`: brings the platform up locally (no Docker) on the stack `make up` started, runs
the scripted DR scenario and prints what it verified, one `PASS <check>` or
`FAIL <check>: <why>` line per check, then exits non-zero if any check failed.

Every run uses a fresh database and topic prefix, so it can be repeated; logs of every process
go to `.state/demo/<run>/`.

The parts: `__main__.py` sets the run up (database, topic prefix, log folder) and runs the
stories in order, each only if every check before it passed; `harness.py` starts the
platform's processes for the demo and runs, prints and records each check; one module a story
(registration.py, inventory_policy.py, replication.py, failover.py).
"""
