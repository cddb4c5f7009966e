"""HTTP routes of the failover service, one module a resource: operations on protected items
and their failover state (items.py), jobs (jobs.py: list, show with tasks and history, watch,
restart, approve a manual action), recovery plans (plans.py: CRUD and runs); what they share
(the operation's options, a refusal as HTTP, a job as JSON) is in common.py. No business rules
here: handlers decide.

An operation answers 202 with the job it started. A failover in progress cannot be cancelled
(replication has already been stopped): there is no cancel route. A failed job that may be
re-run is restarted with `POST /jobs/{id}/restart`.
"""

from __future__ import annotations

from fastapi import APIRouter

from services.failover.api import items, jobs, plans

router = APIRouter()
for part in (items, jobs, plans):
    router.include_router(part.router)
