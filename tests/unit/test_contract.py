"""The event contract under docs/contract is generated from shared/schemas and up to date; the
AsyncAPI document is valid by the specification's own JSON Schema (vendored, offline); every
example validates against its event's JSON Schema, parses with the pydantic model and, when
signed, carries a signature the platform accepts."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from scripts import contract
from shared import topics
from shared.kafka.decode import decode_event
from shared.schemas.envelope import Envelope
from shared.schemas.registry import EVENT_TYPES

ASYNCAPI_SCHEMA = Path(__file__).resolve().parents[1] / "data" / "asyncapi-3.0.0-schema.json"


def test_generated_files_are_up_to_date() -> None:
    wanted = contract.files()
    stale = [str(p.relative_to(contract.REPO)) for p, t in wanted.items() if not p.exists()
             or p.read_text() != t]  # fmt: skip
    extra = [
        str(p.relative_to(contract.REPO))
        for folder in (contract.SCHEMAS, contract.EXAMPLES)
        for p in folder.glob("*.json")
        if p not in wanted
    ]
    assert not stale and not extra, (
        f"stale {stale}, extra {extra}: run `.venv/bin/python -m scripts.contract`"
    )


def asyncapi_validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads(ASYNCAPI_SCHEMA.read_text()))


def test_asyncapi_document_is_valid() -> None:
    doc = yaml.safe_load(contract.ASYNCAPI.read_text())
    errors = [f"{list(e.path)}: {e.message}" for e in asyncapi_validator().iter_errors(doc)]
    assert errors == [], "\n".join(errors[:10])


def test_the_validator_catches_a_broken_document() -> None:
    doc = yaml.safe_load(contract.ASYNCAPI.read_text())
    broken = copy.deepcopy(doc)
    broken["channels"]["registration-heartbeats-v1"]["adress"] = "typo"
    assert list(asyncapi_validator().iter_errors(broken))
    broken = copy.deepcopy(doc)
    broken["asyncapi"] = "2.6.0"
    assert list(asyncapi_validator().iter_errors(broken))


def test_asyncapi_covers_every_topic_event_and_dlq() -> None:
    doc: dict[str, Any] = yaml.safe_load(contract.ASYNCAPI.read_text())
    addresses = {c["address"] for c in doc["channels"].values()}
    for topic in topics.ALL_TOPICS:
        assert topic in addresses and topics.dlq_of(topic) in addresses, topic
    messages = doc["components"]["messages"]
    for et in EVENT_TYPES.values():
        message = messages[f"{et.name}.v{et.version}"]
        channel = doc["channels"][contract.channel_id(et.topic)]
        assert f"{et.name}.v{et.version}" in channel["messages"]
        assert message["bindings"]["kafka"]["key"]["description"]
        assert message["examples"][0]["payload"]["type"] == et.name
    headers = messages["DeadLetter"]["headers"]["properties"]
    assert set(headers) == {
        "dlq.reason", "dlq.detail", "dlq.source.topic", "dlq.source.partition",
        "dlq.source.offset", "dlq.consumer.group", "dlq.at",
    }  # fmt: skip
    assert "Ed25519" in doc["info"]["description"]


@pytest.mark.parametrize("name", sorted(f"{n}.v{v}" for n, v in EVENT_TYPES))
def test_example_validates_and_parses(name: str) -> None:
    et = next(e for e in EVENT_TYPES.values() if f"{e.name}.v{e.version}" == name)
    example = json.loads((contract.EXAMPLES / f"{name}.json").read_text())
    schema = json.loads((contract.SCHEMAS / f"{name}.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    ).validate(example)
    envelope = Envelope.model_validate(example)
    et.model.model_validate(envelope.payload)
    # the consumers' own decoding accepts it (no max age: the example's time is fixed)
    decoded, payload = decode_event(json.dumps(example).encode(), None)
    assert isinstance(payload, et.model)
    if et.signed:
        assert decoded.signature_valid(contract.EXAMPLE_PUBLIC_KEY)


def test_schema_rejects_what_the_model_rejects() -> None:
    example = json.loads((contract.EXAMPLES / "Heartbeat.v1.json").read_text())
    schema = json.loads((contract.SCHEMAS / "Heartbeat.v1.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    for broken in (
        {**example, "type": "Other"},
        {**example, "signature": None},
        {**example, "payload": {**example["payload"], "unknown": 1}},
        {k: v for k, v in example.items() if k != "vault_id"},
    ):
        assert list(validator.iter_errors(broken)), broken
