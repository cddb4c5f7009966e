"""Register an upstream publisher as a producer of a vault, with a Kafka principal of its own:
what an upstream system runs once before it publishes with kcat (docs/publishing-events.md).

    DR_REGISTRATION_KEY=drk_... python -m scripts.publisher_register \\
        --name erp-feed-01.contoso.local --kind provider --site primary --out publisher/

It does what a site provider or host agent does when it registers (`shared.edge_identity`):
makes an Ed25519 key pair (event signatures) and an EC P-256 key pair (Kafka), sends the two
public halves (`public_key`, and `kafka_csr` with CN=<name>) to `POST /v1/registrations` with
the vault's registration key, and keeps the private keys on this machine. Into `--out`
(created mode 0700) it writes, each mode 0600:

- `identity.json`: producer id, vault id, kind, generation, the credential (shown once by the
  service), the Ed25519 private key and the Kafka key and certificate (what
  `python -m scripts.sign_event --identity` reads);
- `kafka.pem`: the issued certificate followed by the edge CA's (the chain kcat presents);
  its CN, the Kafka principal, is `edge-<producer id>-g<generation>`;
- `kafka.key`: its private key.

Standard output is kcat's `-X` options for that certificate (one line), e.g.
`PUBLISHER=$(python -m scripts.publisher_register ...)`. Kafka lets the principal do what its
kind may (see docs/security.md, "Kafka authentication and ACLs"): a `provider` writes
heartbeats and discovery, an `agent` heartbeats, agent events and deltas.

- `--renew`: a new Kafka key pair and certificate for the identity in `--out` (same
  principal and ACLs), authenticated by its credential; run it before the certificate expires
  (30 days by default; `not after` is printed on standard error).
- `--force`: register again although `--out` holds an identity (a new credential, key pairs,
  principal; the old ones stop working). The service asks for an admin token of the vault in
  `DR_ADMIN_TOKEN` for that.

Settings from the environment: `DR_REGISTRATION_URL` (default http://127.0.0.1:8101; the
gateway's URL works too), `DR_REGISTRATION_KEY`, `DR_KAFKA_CA_FILE` (the platform CA, for the
printed options). Exit code 0 registered, 1 refused (the service's message on standard error),
2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
from pathlib import Path

import httpx
from pydantic import SecretStr

from shared import edge_pki
from shared.edge_identity import (
    EdgeSettings,
    Identity,
    LegacyIdentity,
    RegistrationFailed,
    load_identity,
    register,
    renew_kafka_certificate,
    save_identity,
)
from shared.schemas.registration import ProducerKind


def kcat_options(ca_file: str, cert_file: Path, key_file: Path) -> list[str]:
    """kcat's (librdkafka's) `-X` options for a client certificate over TLS."""
    options = ["security.protocol=ssl"]
    if ca_file:
        options.append(f"ssl.ca.location={ca_file}")
    options += [f"ssl.certificate.location={cert_file}", f"ssl.key.location={key_file}"]
    return [arg for option in options for arg in ("-X", option)]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.publisher_register",
        description="Register an upstream publisher (its own Kafka certificate and signing key)"
        " and print kcat's -X options for it.",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the identity files")
    parser.add_argument("--name", help="the publisher's name (its CSR's CN), e.g. an FQDN")
    parser.add_argument(
        "--kind",
        choices=[k.value for k in ProducerKind],
        help="producer kind: what it may write (provider: heartbeats, discovery; agent:"
        " heartbeats, agent events, deltas)",
    )
    parser.add_argument("--site", default="primary", help="site (default primary)")
    parser.add_argument(
        "--heartbeat-seconds", type=float, default=30.0, help="heartbeat interval (default 30)"
    )
    parser.add_argument(
        "--registration-key-file",
        type=Path,
        help="file holding the registration key (default: DR_REGISTRATION_KEY)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--force", action="store_true", help="register again (DR_ADMIN_TOKEN)")
    mode.add_argument("--renew", action="store_true", help="renew the Kafka certificate only")
    return parser


def _settings(args: argparse.Namespace) -> EdgeSettings:
    """The edge settings of the registration: the arguments, then the environment."""
    settings = EdgeSettings(
        state_dir=args.out,
        site=args.site,
        heartbeat_seconds=args.heartbeat_seconds,
        force_register=args.force,
        kafka_security="tls",
    )
    if args.name:
        settings.name = args.name
    if args.registration_key_file is not None:
        settings.registration_key = SecretStr(args.registration_key_file.read_text().strip())
    return settings


async def _run(args: argparse.Namespace, settings: EdgeSettings) -> Identity:
    saved = load_identity(args.out)
    if args.renew:
        if saved is None:
            raise RegistrationFailed(f"{args.out} holds no identity to renew: register first")
        return await renew_kafka_certificate(settings, saved)
    if saved is not None and not args.force:
        raise RegistrationFailed(
            f"{args.out} already holds producer {saved.producer_id} ({saved.kind} {saved.name}):"
            " --renew for a new certificate, --force to register again"
        )
    return await register(settings, ProducerKind(args.kind), {"publisher": "kcat"})


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.renew and not (args.name and args.kind):
        parser.error("--name and --kind are needed to register")
    try:
        settings = _settings(args)
        identity = asyncio.run(_run(args, settings))
    except (RegistrationFailed, LegacyIdentity, OSError, ValueError, httpx.HTTPError) as exc:
        print(f"publisher_register: {exc}", file=sys.stderr)
        return 1
    if identity.kafka_certificate is None or identity.kafka_key is None:
        save_identity(args.out, identity)
        print(
            "publisher_register: registered, but the registration service issued no Kafka"
            " certificate (it runs without an edge CA or with Kafka without TLS)",
            file=sys.stderr,
        )
        return 1
    save_identity(args.out, identity)
    cert, key = edge_pki.write_client_files(
        args.out, identity.kafka_certificate, identity.kafka_key
    )
    print(
        f"producer {identity.producer_id} of vault {identity.vault_id}: Kafka principal"
        f" {edge_pki.principal_of(identity.producer_id, identity.generation)}, certificate"
        f" valid until {edge_pki.certificate_not_after(identity.kafka_certificate).isoformat()}",
        file=sys.stderr,
    )
    print(shlex.join(kcat_options(settings.kafka_ca_file, cert, key)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
