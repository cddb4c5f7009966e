"""Bootstrap a fresh platform for compose/first use: create a vault (if missing) and a
registration key, and write the key to a file that site providers and host agents read.

Environment: `DR_REGISTRATION_URL`, `DR_ADMIN_TOKEN`, `DR_BOOTSTRAP_VAULT` (default
`default`), `DR_BOOTSTRAP_KEY_FILE` (default `/bootstrap/registration.key`).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import httpx


def main() -> int:
    url = os.environ.get("DR_REGISTRATION_URL", "http://127.0.0.1:8101")
    token = os.environ.get("DR_ADMIN_TOKEN", "")
    vault_name = os.environ.get("DR_BOOTSTRAP_VAULT", "default")
    key_file = Path(os.environ.get("DR_BOOTSTRAP_KEY_FILE", "/bootstrap/registration.key"))
    if not token:
        print("DR_ADMIN_TOKEN is not set: the bootstrap needs the bootstrap admin token")
        return 2
    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + 120
    with httpx.Client(base_url=url, timeout=10, headers=headers) as http:
        while True:
            try:
                if http.get("/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                print(f"registration service at {url} not healthy after 120 s")
                return 1
            time.sleep(1)
        vaults = {v["name"]: v for v in http.get("/v1/vaults").json()}
        vault = vaults.get(vault_name)
        if vault is None:
            resp = http.post("/v1/vaults", json={"name": vault_name})
            resp.raise_for_status()
            vault = resp.json()
        key = http.post(f"/v1/vaults/{vault['vault_id']}/registration-keys", json={})
        key.raise_for_status()
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_text(key.json()["key"])
    key_file.chmod(0o640)
    (key_file.parent / "vault_id").write_text(str(vault["vault_id"]))
    print(f"vault {vault_name} ({vault['vault_id']}): registration key written to {key_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
