"""Key lifecycle on a real federation (issue 15, acceptance 4): re-keying with ``--force``.

A SuperLink and 3 SuperNodes on 127.0.0.1 with TLS and SuperNode authentication, as in
``test_deploy_federation.py``: site2 enrolled with its own key (``medfed site keygen``, no
private key in its kit). Then ``medfed provision --force`` re-keys site1 with a new key of its
own (and, being forced, re-issues everything the coordinator generates). The previous keys are
in a backup; after ``medfed server start`` the old site1 key is refused by the SuperLink
(``flower-supernode`` fails with Flower's exit code 305, "Failed to activate SuperNode"), and the three sites
join with their new kits. Slow: SuperLink and SuperNode starts take minutes on 2 shared cores.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medfed.server.provision import load_federation
from tests.support.deploy_support import MEDFED, LiveFederation, free_port

pytestmark = pytest.mark.slow

SITES = ("site0", "site1", "site2")
FLOWER_SUPERNODE = str(Path(sys.executable).parent / "flower-supernode")


def _medfed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MEDFED, *args], capture_output=True, text=True, timeout=120)


def _keygen(folder: Path) -> Path:
    out = _medfed("site", "keygen", "--out", str(folder))
    assert out.returncode == 0, out.stderr
    return folder / "site-auth.key"


def _connected(live: LiveFederation) -> None:
    for name, proc in live.sites.items():
        assert proc.wait_for("connected to the SuperLink", 120), f"{name}:\n{proc.text()[-3000:]}"


def test_force_rekey_backs_up_and_the_old_key_can_no_longer_connect(tmp_path: Path) -> None:
    started = time.perf_counter()
    root = tmp_path / "fed"
    address = f"127.0.0.1:{free_port()}"
    site2_key = _keygen(tmp_path / "site2-keys")
    first = _medfed("provision", str(root), "--site", "site0", "--site", "site1", "--address", address,
                    "--site-public-key", f"site2={site2_key.with_suffix('.pub')}")
    assert first.returncode == 0, first.stderr
    fed = load_federation(root)
    assert not (fed.site("site2").kit / "site-auth.key").exists()  # the coordinator never had it
    old_kit1 = tmp_path / "old-site1"
    shutil.copytree(fed.site("site1").kit, old_kit1)

    live = LiveFederation(root=tmp_path, fed=fed)
    try:
        live.start_server()
        for index, name in enumerate(SITES):
            live.start_site(name, index, auth_private_key=site2_key if name == "site2" else None)
        _connected(live)
        live.stop()

        # Re-key site1 with a key of its own; --force re-issues everything else.
        site1_key = _keygen(tmp_path / "site1-keys")
        again = _medfed("provision", str(root), "--site", "site0", "--site", "site1", "--address", address,
                        "--site-public-key", f"site2={site2_key.with_suffix('.pub')}",
                        "--site-public-key", f"site1={site1_key.with_suffix('.pub')}", "--force")
        assert again.returncode == 0, again.stderr
        summary = json.loads(again.stdout[again.stdout.index("{"):])
        assert summary["rekeyed"] == ["site0", "site1"] and summary["dropped"] == []  # site2 kept its own key
        assert "re-keyed: site site1" in again.stderr
        backup = Path(summary["backup"])
        assert stat.S_IMODE(backup.stat().st_mode) == 0o700
        assert (backup / "sites" / "site1" / "site-auth.key").read_bytes() == (old_kit1 / "site-auth.key").read_bytes()
        for rel in ("ca/ca.key", "ca/ca.crt", "superlink/server.key", "coordinator/app-signing.key"):
            assert (backup / rel).is_file(), rel
        fed = load_federation(root)
        assert not (fed.site("site1").kit / "site-auth.key").exists()

        live = LiveFederation(root=tmp_path, fed=fed, server_starts=1)
        server = live.start_server()  # the same state database: the old keys were registered in it
        assert server.wait_for("unregistered node", 30), server.text()[-3000:]
        assert "(site1: key not enrolled)" in server.text() and "(site0: key not enrolled)" in server.text()

        # The old site1 key, with the new CA: the SuperLink refuses it.
        attempt = subprocess.run(
            [FLOWER_SUPERNODE, "--superlink", address, "--root-certificates", str(fed.ca_cert),
             "--auth-supernode-private-key", str(old_kit1 / "site-auth.key"),
             "--port", str(free_port()), "--isolation", "process"],
            capture_output=True, text=True, timeout=180,
            env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"},
        )
        output = attempt.stdout + attempt.stderr
        # Flower 1.42 logs its exit code 305; the process (uvicorn's shutdown) then exits 1.
        assert attempt.returncode != 0, output[-3000:]
        assert "Exit Code: 305" in output and "Failed to activate SuperNode" in output, output[-3000:]
        assert "No SuperNode found with the given public key" in server.text()

        # The new kits (site1 and site2 with their own keys) join.
        keys = {"site1": site1_key, "site2": site2_key}
        for index, name in enumerate(SITES):
            live.start_site(name, index, auth_private_key=keys.get(name), log=f"{name}-rekeyed")
        _connected(live)
    finally:
        live.stop()
    print(f"\nre-key with --force, 3 sites on the deployment engine: {time.perf_counter() - started:.1f} s")
