"""The refusals of the failover rules. They carry no HTTP status: the routes map them
(services/failover/api/common.py)."""

from __future__ import annotations


class FailoverRefused(Exception):
    """A refused request: the state of what it names does not allow it now."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(FailoverRefused):
    """The request names something (an item, a job, a plan, a point) that does not exist."""


class InvalidRequest(FailoverRefused):
    """The request itself is incomplete or contradictory, whatever the state."""
