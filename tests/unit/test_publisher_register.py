"""`python -m scripts.publisher_register` on bad input: a clear message and exit code, no
traceback, and an identity in the folder never overwritten (the registration itself runs in
tests/e2e/test_kcat_e2e.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from scripts.publisher_register import kcat_options, main
from shared import signing
from shared.edge_identity import Identity, save_identity
from shared.schemas.registration import ProducerKind


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DR_REGISTRATION_KEY", raising=False)
    monkeypatch.setenv("DR_REGISTRATION_URL", "http://127.0.0.1:9")  # nothing listens


def saved(folder: Path) -> Identity:
    identity = Identity(
        producer_id=uuid.uuid4(),
        vault_id=uuid.uuid4(),
        kind=ProducerKind.PROVIDER,
        name="feed.contoso.local",
        site="erp",
        generation=1,
        credential="drc_x",
        private_key=signing.private_key_hex(signing.new_private_key()),
    )
    save_identity(folder, identity)
    return identity


def test_name_and_kind_are_needed_to_register(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "p"), "--kind", "provider"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "p"), "--name", "x", "--kind", "publisher"])


def test_without_a_registration_key_it_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--out", str(tmp_path / "p"), "--name", "x", "--kind", "agent"]) == 1
    err = capsys.readouterr().err
    assert "registration key" in err and "Traceback" not in err
    assert not (tmp_path / "p" / "identity.json").exists()


def test_an_unreachable_service_is_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "key"
    key.write_text("drk_abc\n")
    args = ["--out", str(tmp_path / "p"), "--name", "x", "--kind", "agent"]
    assert main([*args, "--registration-key-file", str(key)]) == 1
    assert capsys.readouterr().err.startswith("publisher_register: ")


def test_a_folder_with_an_identity_is_not_registered_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DR_REGISTRATION_KEY", "drk_abc")
    identity = saved(tmp_path)
    before = (tmp_path / "identity.json").read_bytes()
    assert main(["--out", str(tmp_path), "--name", "x", "--kind", "agent"]) == 1
    err = capsys.readouterr().err
    assert f"already holds producer {identity.producer_id}" in err and "--force" in err
    assert (tmp_path / "identity.json").read_bytes() == before


def test_renewing_needs_an_identity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path), "--renew"]) == 1
    assert "holds no identity to renew" in capsys.readouterr().err


def test_kcat_options_name_the_ca_certificate_and_key() -> None:
    assert kcat_options("/p/ca.pem", Path("/o/kafka.pem"), Path("/o/kafka.key")) == [
        "-X", "security.protocol=ssl",
        "-X", "ssl.ca.location=/p/ca.pem",
        "-X", "ssl.certificate.location=/o/kafka.pem",
        "-X", "ssl.key.location=/o/kafka.key",
    ]  # fmt: skip
