"""An edge process's identity: its settings, the registration with a vault's registration key,
the identity file it keeps, and how it reaches Kafka with the certificate it was issued.

The identity (`identity.json` in the process's state folder, mode 0600, written atomically)
holds the credential the registration service shows once and the Ed25519 private key the
process made for that registration; only the public key was sent. With Kafka over TLS
(`DR_KAFKA_SECURITY=tls`) it also holds the edge's own Kafka client key (made here, sent only as
a CSR) and the certificate the registration service issued for it (`shared.edge_pki`): every
Kafka client of the process presents that certificate (files `kafka.pem`/`kafka.key` beside
the identity), never a certificate from the environment. A saved identity without one, or with
one that has less than a third of its validity left, gets a new one at start
(`POST /v1/self/kafka-certificate`, authenticated by the credential); a running edge renews it
with `shared.edge_renewal`. An identity file from before Ed25519 signatures (a credential and no
private key) is replaced by a forced re-registration when the registration key is set, and
refused with a message saying so otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, Field, SecretStr, ValidationError

from shared import edge_pki, signing
from shared.files import replace_synced
from shared.kafka.security import KafkaSecurity
from shared.schemas.registration import ProducerKind
from shared.settings import CommonSettings

log = logging.getLogger(__name__)


class EdgeSettings(CommonSettings):
    """Settings of an edge process; subclasses set the env prefix (`DR_AGENT_`, ...)."""

    registration_url: str = Field(
        default="http://127.0.0.1:8101", description="Registration service base URL."
    )
    registration_key: SecretStr | None = Field(
        default=None, description="Needed only for the first registration (or a forced one)."
    )
    name: str = Field(default="", description="Server name (FQDN); default: the host name.")
    site: str = Field(default="primary", description="Site this server belongs to.")
    state_dir: Path = Field(
        default=Path(".state/edge"),
        description="Holds the identity (credential and Ed25519 private key, mode 0600).",
    )
    heartbeat_seconds: float = Field(default=5.0, gt=0, le=3600, description="Heartbeat interval.")
    force_register: bool = Field(
        default=False,
        description="Re-register even with a saved identity (new credential and key pair).",
    )
    http_host: str = Field(default="127.0.0.1", description="HTTP listen address.")
    http_port: int = Field(
        default=0, ge=0, le=65535, description="/healthz and /metrics port (0: any free)."
    )


class Identity(BaseModel):
    producer_id: uuid.UUID
    vault_id: uuid.UUID
    kind: ProducerKind
    name: str
    site: str
    generation: int
    credential: str
    private_key: str = Field(
        pattern=signing.PRIVATE_KEY_HEX, repr=False, description="Ed25519 seed (hex); never sent."
    )
    kafka_key: str | None = Field(
        default=None, repr=False, description="Kafka client private key (PEM); never sent."
    )
    kafka_certificate: str | None = Field(
        default=None, description="Its certificate and the edge CA's (PEM), from registration."
    )

    @property
    def signing_key(self) -> Ed25519PrivateKey:
        return signing.load_private_key(self.private_key)

    @property
    def public_key(self) -> str:
        return signing.public_key_hex(self.signing_key)


class RegistrationFailed(Exception):
    pass


class LegacyIdentity(Exception):
    """The saved identity has no Ed25519 private key (it signed with the retired HMAC scheme).
    `credential` is its credential, which proves who re-registers (no admin token needed)."""

    def __init__(self, message: str, credential: str | None) -> None:
        super().__init__(message)
        self.credential = credential


def identity_path(state_dir: Path) -> Path:
    return state_dir / "identity.json"


def load_identity(state_dir: Path) -> Identity | None:
    """The saved identity, None if there is none; `LegacyIdentity` for one without a key."""
    path = identity_path(state_dir)
    if not path.exists():
        return None
    text = path.read_text()
    try:
        return Identity.model_validate_json(text)
    except ValidationError as exc:
        if any(err["loc"] == ("private_key",) for err in exc.errors()):
            try:
                credential = json.loads(text).get("credential")
            except (ValueError, AttributeError):
                credential = None
            raise LegacyIdentity(
                f"{path} was saved before Ed25519 event signatures and has no private key:"
                " its events would be refused. Set the registration key to re-register this"
                " server (a forced re-registration that makes a new key pair), or remove the"
                " file and register it again",
                credential if isinstance(credential, str) else None,
            ) from None
        raise


def save_identity(state_dir: Path, identity: Identity) -> None:
    """Atomically and durably (temporary file, fsync, rename, fsync of the folder) and readable
    by the owner only: it holds the private key. The mode is set on the open file too, as a
    left-over temporary file keeps its own mode through O_CREAT."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = identity_path(state_dir)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(identity.model_dump_json())
        fh.flush()
        os.fsync(fh.fileno())
    replace_synced(tmp, path)


async def register(
    settings: EdgeSettings,
    kind: ProducerKind,
    metadata: dict[str, Any],
    *,
    force: bool = False,
    credential: str | None = None,
) -> Identity:
    """POST /v1/registrations with the registration key and a new Ed25519 public key (the
    private key goes only into the returned identity); raises with the service's message.
    A forced one proves its right with `credential` (the server's own) or the admin token."""
    if settings.registration_key is None:
        raise RegistrationFailed(
            "no identity in the state folder and no registration key: set the registration key"
        )
    private_key = signing.new_private_key()
    kafka_key = edge_pki.new_key() if settings.kafka_security == "tls" else None
    body: dict[str, Any] = {
        "kind": kind.value,
        "name": settings.name,
        "site": settings.site,
        "heartbeat_interval_seconds": settings.heartbeat_seconds,
        "force": force or settings.force_register,
        "metadata": metadata,
        "public_key": signing.public_key_hex(private_key),
    }
    if kafka_key is not None:
        body["kafka_csr"] = edge_pki.csr_pem(kafka_key, settings.name)
    headers = {"Authorization": f"Bearer {settings.registration_key.get_secret_value()}"}
    if credential is not None:  # renewing its own identity
        headers["X-DR-Credential"] = credential
    elif settings.force_register and settings.admin_token is not None:  # needed to force
        headers["X-DR-Admin-Token"] = settings.admin_token.get_secret_value()
    answer = await _post(settings, "/v1/registrations", body, headers, 201)
    return identity_from(answer, private_key, edge_pki.key_pem(kafka_key) if kafka_key else None)


async def _post(
    settings: EdgeSettings, path: str, body: dict[str, Any], headers: dict[str, str], ok: int
) -> dict[str, Any]:
    """POST to the registration service; its answer, or RegistrationFailed with its message."""
    async with httpx.AsyncClient(base_url=settings.registration_url, timeout=10) as client:
        resp = await client.post(path, json=body, headers=headers)
    if resp.status_code != ok:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text
        raise RegistrationFailed(f"registration refused ({resp.status_code}): {message}")
    answer: dict[str, Any] = resp.json()
    return answer


async def renew_kafka_certificate(settings: EdgeSettings, identity: Identity) -> Identity:
    """The identity with a new Kafka key pair and certificate (same principal and ACLs)."""
    kafka_key = edge_pki.new_key()
    answer = await _post(
        settings,
        "/v1/self/kafka-certificate",
        {"kafka_csr": edge_pki.csr_pem(kafka_key, identity.name)},
        {"Authorization": f"Bearer {identity.credential}"},
        200,
    )
    return identity.model_copy(
        update={
            "kafka_key": edge_pki.key_pem(kafka_key),
            "kafka_certificate": answer["kafka_certificate"],
        }
    )


def identity_from(
    registered: dict[str, Any], private_key: Ed25519PrivateKey, kafka_key: str | None = None
) -> Identity:
    """The identity from a registration's answer and the private key of its public key."""
    return Identity(
        producer_id=registered["producer_id"],
        vault_id=registered["vault_id"],
        kind=ProducerKind(registered["kind"]),
        name=registered["name"],
        site=registered["site"],
        generation=registered["generation"],
        credential=registered["credential"],
        private_key=signing.private_key_hex(private_key),
        kafka_key=kafka_key if registered.get("kafka_certificate") else None,
        kafka_certificate=registered.get("kafka_certificate"),
    )


async def obtain_identity(
    settings: EdgeSettings, kind: ProducerKind, metadata: dict[str, Any]
) -> Identity:
    """The saved identity, or a new registration (also when `force_register` is set, and a
    forced one in place of an identity from before Ed25519 signatures)."""
    try:
        saved = load_identity(settings.state_dir)
        legacy, credential = False, None
    except LegacyIdentity as exc:
        if settings.registration_key is None:
            raise RegistrationFailed(str(exc)) from None
        log.warning("re-registering: saved identity has no Ed25519 key", extra={"error": str(exc)})
        saved, legacy, credential = None, True, exc.credential
    if saved is not None and not settings.force_register:
        return await _with_current_certificate(settings, saved)
    identity = await register(settings, kind, metadata, force=legacy, credential=credential)
    save_identity(settings.state_dir, identity)
    log.info(
        "registered",
        extra={"producer_id": str(identity.producer_id), "generation": identity.generation},
    )
    return identity


async def _with_current_certificate(settings: EdgeSettings, saved: Identity) -> Identity:
    """The saved identity, with a new Kafka certificate if Kafka runs over TLS and it has none
    or less than a third of its validity is left."""
    if settings.kafka_security != "tls":
        return saved
    cert = saved.kafka_certificate
    if cert is not None and not edge_pki.needs_renewal(cert, datetime.now(UTC)):
        return saved
    try:
        renewed = await renew_kafka_certificate(settings, saved)
    except (RegistrationFailed, httpx.HTTPError) as exc:
        if cert is None:
            raise RegistrationFailed(f"no Kafka certificate and none issued: {exc}") from None
        log.warning(
            "Kafka certificate not renewed; using the current one", extra={"error": str(exc)}
        )
        return saved
    save_identity(settings.state_dir, renewed)
    log.info("Kafka certificate renewed", extra={"producer_id": str(saved.producer_id)})
    return renewed


def kafka_security(settings: EdgeSettings, identity: Identity) -> KafkaSecurity:
    """How this edge reaches Kafka: with TLS, its own certificate (written beside the identity)
    in one TLS context that all the edge's clients share (a renewal reloads it); plaintext
    otherwise."""
    if settings.kafka_security != "tls":
        return KafkaSecurity.from_settings(settings)
    if identity.kafka_certificate is None or identity.kafka_key is None:
        raise RegistrationFailed("Kafka runs over TLS and this edge has no certificate of its own")
    cert, key = edge_pki.write_client_files(
        settings.state_dir, identity.kafka_certificate, identity.kafka_key
    )
    return KafkaSecurity("tls", settings.kafka_ca_file, str(cert), str(key)).shared()
