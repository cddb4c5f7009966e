"""An edge process's /healthz names an unreachable broker the way the services' does: the
same watch (a metadata request every few seconds) decides `kafka` and degrades the status."""

from __future__ import annotations

from shared.edge import EdgeRuntime
from shared.edge_identity import EdgeSettings
from shared.schemas.registration import ProducerKind


async def broker_silent() -> str | None:
    return "no broker answered a metadata request within 2s"


async def broker_answers() -> str | None:
    return None


async def test_edge_health_reports_kafka_unreachable_then_ok() -> None:
    runtime = EdgeRuntime("host-agent", EdgeSettings(), ProducerKind.AGENT)
    report = await runtime.health()
    assert report["checks"]["kafka"] == "unreachable: not probed yet", report

    assert not await runtime.broker.probe(broker_silent)
    report = await runtime.health()
    assert report["checks"]["kafka"] == (
        "unreachable: no broker answered a metadata request within 2s"
    ), report
    assert report["status"] == "degraded"

    assert await runtime.broker.probe(broker_answers)
    assert (await runtime.health())["checks"]["kafka"] == "ok"
    assert runtime.broker.recovered_at is not None
