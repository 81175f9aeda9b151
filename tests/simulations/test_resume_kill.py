"""SIGKILL a real ``medfed simulate`` process (and its Ray cluster) after round 2 of 4, resume it,
and compare with the same run left alone: same rounds, same weights, same privacy ledgers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medfed.server.dashboard.read_models import RunReader
from medfed.server.run_dir import read_metrics
from medfed.server.store import RunStore
from medfed.shared.config import RunConfig
from medfed.shared.privacy import PrivacyLedger, site_ledger_path
from medfed.simulations.interrupt import descendants, is_alive

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# DP-SGD with noise from the run's seed (dp-secure-noise = false): the only way two runs can
# end with the same weights.
OPTIONS = ["--sites", "3", "--model", "simplecnn", "--norm", "group", "--rounds", "4", "--local-epochs", "2",
           "--batch-size", "16", "--image-size", "16",
           "--set", "synthetic-samples=240", "--set", "dp=true", "--set", "dp-noise-multiplier=1.1",
           "--set", "dp-secure-noise=false"]


def _medfed(*args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "medfed.cli", "simulate", *args],
        cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def _finish(proc: subprocess.Popen[bytes], timeout: float = 900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    return text




def _saved_round(run_dir: Path) -> int | None:
    try:
        return int(torch.load(run_dir / "checkpoints" / "resume.pt", weights_only=True)["round"])
    except Exception:  # noqa: BLE001 - not written yet
        return None


def _only_run(base: Path) -> Path:
    [run] = [p for p in base.iterdir() if p.is_dir() and (p / "config.json").exists()]
    return run


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the Ray processes through /proc")
def test_sigkill_after_round_2_then_resume_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    killed_base, straight_base = tmp_path / "killed", tmp_path / "straight"

    proc = _medfed(*OPTIONS, "--run-dir", str(killed_base))
    deadline = time.monotonic() + 900
    run_dir = None
    while time.monotonic() < deadline:  # wait until round 2 is recorded and its resume state saved
        assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-3000:]  # type: ignore[union-attr]
        runs = [p for p in killed_base.glob("*/metrics.jsonl")] if killed_base.exists() else []
        if runs and any(json.loads(line).get("round") == 2 for line in runs[0].read_text().splitlines()
                        if line.endswith("}")) and _saved_round(runs[0].parent) == 2:
            run_dir = runs[0].parent
            break
        time.sleep(0.05)
    assert run_dir is not None, "round 2 never completed"
    family = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)  # the server and everything in its session (Ray's workers)
    for pid in family:  # anything Ray started in a session of its own
        if is_alive(pid):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    time.sleep(1)
    assert not [pid for pid in family if is_alive(pid)], "processes of the killed run survived"

    cfg = RunConfig.from_mapping(json.loads((run_dir / "config.json").read_text())["config"])
    # Round 3 had started at the sites. A site that finished its round-3 training before the kill
    # charged it to its ledger: that release happened, so the resumed run's round 3 is charged
    # again (the accounting stays conservative) and the epsilons then differ by exactly that.
    charged_at_kill = {site: [e.round for e in PrivacyLedger.load(site_ledger_path(cfg, site_index=site)).entries]
                       for site in range(cfg.num_sites)}
    assert all(rounds in ([1, 2], [1, 2, 3]) for rounds in charged_at_kill.values()), charged_at_kill
    assert not (run_dir / "summary.json").exists()

    start = time.monotonic()
    _finish(_medfed("--resume", str(run_dir)))
    resumed_seconds = time.monotonic() - start
    _finish(_medfed(*OPTIONS, "--run-dir", str(straight_base)))
    straight = _only_run(straight_base)

    # Every round once, in metrics.jsonl and in the run store (the same run id).
    assert [r["round"] for r in read_metrics(run_dir)] == [0, 1, 2, 3, 4]
    with RunStore(cfg.store_url) as store:
        [run] = RunReader(store).list_runs()
        assert run["id"] == run_dir.name and run["status"] == "finished" and run["rounds_done"] == 4
        assert [r["round"] for r in RunReader(store).rounds(run["id"])] == [0, 1, 2, 3, 4]
        assert [e["round"] for e in RunReader(store).events(run["id"]) if e["kind"] == "run-resumed"] == [2]
    # The same final weights, bit for bit.
    a = torch.load(run_dir / "checkpoints" / "final.pt", weights_only=False)
    b = torch.load(straight / "checkpoints" / "final.pt", weights_only=False)
    assert a["round"] == b["round"] == 4
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in b["state_dict"])
    assert [r["global"] for r in read_metrics(run_dir)] == [r["global"] for r in read_metrics(straight)]
    # Continuous privacy ledgers: the resumed run kept charging the same files, to the same epsilon.
    straight_cfg = cfg.replace(run_dir=str(straight_base))
    for site in range(cfg.num_sites):
        resumed = PrivacyLedger.load(site_ledger_path(cfg, site_index=site))
        alone = PrivacyLedger.load(site_ledger_path(straight_cfg, site_index=site))
        assert [e.round for e in alone.entries] == [1, 2, 3, 4]
        interrupted = charged_at_kill[site][2:]  # [] or [3]
        assert [e.round for e in resumed.entries] == [1, 2, *interrupted, 3, 4]
        if not interrupted:
            assert resumed.epsilon(cfg.dp_delta) == alone.epsilon(cfg.dp_delta) > 0
        else:  # the uninterrupted ledger with round 3 charged twice
            third = alone.entries[2]
            alone.record_round(server_round=3, steps=third.steps, sample_rate=third.sample_rate,
                               noise_multiplier=third.noise_multiplier, delta=cfg.dp_delta)
            assert resumed.epsilon(cfg.dp_delta) == pytest.approx(alone.epsilon(cfg.dp_delta), rel=1e-12)
    print(f"round 3 charged before the kill: {charged_at_kill}; resumed run took {resumed_seconds:.1f} s")
