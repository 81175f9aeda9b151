"""Helpers for the deployment tests: NIfTI datalists, free ports, supervised subprocesses.

Every process is started in its own session and stopped (SIGTERM, then SIGKILL of the whole
process group) by :meth:`Proc.stop`, which the fixtures call in ``finally`` blocks.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from medfed.server.provision import Federation

RUN = {"model": "simplecnn", "image-size": 16, "norm": "group", "batch-size": 4, "learning-rate": 0.05}
"""A small deployed run: SimpleCNN on 16x16 NIfTI images."""

MEDFED = str(Path(sys.executable).parent / "medfed")
FLWR = str(Path(sys.executable).parent / "flwr")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_nifti_datalist(folder: Path, *, seed: int, n_train: int = 12, n_val: int = 4, size: int = 16) -> Path:
    """A 2D binary classification datalist of NIfTI files (bright blob top-left vs bottom-right)."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    sections: dict[str, list[dict[str, object]]] = {"training": [], "validation": []}
    for section, count in (("training", n_train), ("validation", n_val)):
        for i in range(count):
            label = i % 2
            image = rng.normal(0.0, 0.3, (size, size)).astype(np.float32)
            half = size // 2
            if label:
                image[half:, half:] += 2.0
            else:
                image[:half, :half] += 2.0
            name = f"img/{section}-{i}.nii.gz"
            nib.save(nib.Nifti1Image(image, np.diag([0.8, 0.8, 1.0, 1.0])), str(folder / name))
            sections[section].append({"image": name, "label": label})
    path = folder / "datalist.json"
    path.write_text(json.dumps({**sections, "num_classes": 2}))
    return path


def write_site_toml(
    path: Path, *, name: str, datalist: Path, runtime_port: int, state_dir: Path, auth_private_key: Path | None = None
) -> Path:
    path.write_text(
        f'site-name = "{name}"\n'
        f'datalist = "{datalist}"\n'
        'device = "cpu"\n'
        "dp-budget-epsilon = 8.0\n"
        f"runtime-port = {runtime_port}\n"
        f'state-dir = "{state_dir}"\n'
        + (f'auth-private-key = "{auth_private_key}"\n' if auth_private_key is not None else "")
    )
    return path


class Proc:
    """A subprocess whose output goes to a log file, in its own process group."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log = log
        self._fh = open(log, "ab")  # noqa: SIM115
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen = subprocess.Popen(
            args, stdout=self._fh, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float) -> bool:
        """Whether ``needle`` appears in the log within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.text():
                return True
            if self.popen.poll() is not None:
                return needle in self.text()
            time.sleep(0.3)
        return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        """Signal the process, wait, then SIGKILL its whole process group."""
        try:
            if self.popen.poll() is None:
                self.popen.send_signal(sig)
                try:
                    self.popen.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self._fh.close()


@dataclass
class LiveFederation:
    """A running SuperLink and its sites (see the module fixture)."""

    root: Path
    fed: Federation
    server: Proc | None = None
    sites: dict[str, Proc] = field(default_factory=dict)
    extra: list[Proc] = field(default_factory=list)
    server_starts: int = 0

    @property
    def address(self) -> str:
        return self.fed.superlink_address

    def start_server(self) -> Proc:
        self.server_starts += 1
        self.server = Proc(
            [MEDFED, "server", "start", "-f", str(self.fed.root), "--host", "127.0.0.1"],
            self.root / f"server-{self.server_starts}.log",
        )
        assert self.server.wait_for("site keys at the SuperLink", 90), self.server.text()
        return self.server

    def start_site(self, name: str, index: int, *, auth_private_key: Path | None = None, log: str = "") -> Proc:
        """Start site ``name`` (``auth_private_key``: its own key, for a kit enrolled with its public key)."""
        folder = self.root / name
        datalist = write_nifti_datalist(folder / "data", seed=index)
        toml = write_site_toml(
            folder / "site.toml", name=name, datalist=datalist, runtime_port=free_port(), state_dir=folder / "state",
            auth_private_key=auth_private_key,
        )
        proc = Proc([MEDFED, "site", "start", "--kit", str(self.fed.site(name).kit), "--config", str(toml)],
                    self.root / f"{log or name}.log")
        self.sites[name] = proc
        return proc

    def run_config(self, tag: str, **overrides: object) -> Path:
        values = {**RUN, "run-dir": str(self.root / "runs" / tag), **overrides}
        path = self.root / f"{tag}.toml"
        path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
        return path

    def stop(self) -> None:
        for proc in [*self.extra, *self.sites.values(), *([self.server] if self.server else [])]:
            proc.stop()
