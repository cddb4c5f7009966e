"""The platform's kit for whoever drives it from outside: tests, benchmarks and the demo.

`procs` starts services and edge processes (`python -m ...`) and stops them; `stack` finds the
local Kafka and PostgreSQL (`make up`) and makes fresh databases and topic prefixes; `platform`
is a running platform (services, edges, admin token, vault/token/key helpers); `dr` sets up two
sites with their providers and agents and drives protection and failover over the API; `poll`
waits for a condition with a deadline instead of sleeping a fixed time; `files` checks files
(their SHA-256).
"""
