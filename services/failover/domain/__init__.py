"""Failover rules, pure and synchronous (no I/O): handlers and the workflow engine load the
facts, these modules decide. One module a job:

- errors.py: the refusals (`FailoverRefused`, `NotFound`, `InvalidRequest`), no HTTP status;
- jobs.py: operations, job states, restarts, progress and the durable-step decisions;
- items.py: an item's failover state and the checks each operation makes of it;
- points.py: the recovery point asked for, retained points, data loss and its proof;
- nics.py: network mappings and the recovery VM's NIC placement (docs/reference.md);
- plans.py: recovery plans, their groups and actions, and their limits;
- scripts.py: a plan's script actions (who may change them, their environment, their output).
"""
