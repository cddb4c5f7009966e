"""Event schemas: the envelope every event travels in, and one payload model per event type.

Importing this package registers every event type (see `registry`).
"""

from shared.schemas import agent as agent
from shared.schemas import failover as failover
from shared.schemas import inventory as inventory
from shared.schemas import policy as policy
from shared.schemas import registration as registration
from shared.schemas import replication as replication
from shared.schemas.envelope import Envelope, EventPayload, new_envelope
from shared.schemas.registry import EVENT_TYPES, EventType, payload_model

__all__ = ["EVENT_TYPES", "Envelope", "EventPayload", "EventType", "new_envelope", "payload_model"]
