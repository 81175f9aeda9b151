"""State a site keeps between rounds of one run: local BatchNorm entries, SCAFFOLD's control variate.

A simulated site is rebuilt every round (Flower recreates the ClientApp) and a real site may
restart, so the state lives in a file, like the privacy ledger: ``<ledger-dir>/state/<run>/
site-<k>.pt`` or, with ``ledger-dir`` empty, ``<run-dir>/site-state/<run>/site-<k>.pt``, where
``<run>`` hashes the run config (less ``resume`` and the signature, so a resumed run continues
its sites' state). The file holds the state after each of the site's last two rounds; round
``r`` reads the latest one saved before ``r`` (so a site that finished round ``r`` before a
crash redoes it from the state of ``r - 1``), and round 1 starts afresh (no state of an earlier
run with the same config is reused). Nothing here travels in a Flower message.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfed.shared.config import RunConfig
from medfed.shared.files import write_atomically

__all__ = ["SiteState", "site_state_path", "run_key"]

logger = logging.getLogger(__name__)

_NOT_KEYED = ("resume", "app-signature")
KEEP_ROUNDS = 2


def run_key(cfg: RunConfig) -> str:
    """12 hex digits identifying the run (its config less ``resume`` and ``app-signature``)."""
    fields = {k: v for k, v in cfg.to_run_config().items() if k not in _NOT_KEYED}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]


def site_state_path(cfg: RunConfig, *, site_index: int) -> Path:
    """Where site ``site_index`` keeps its state for this run (see the module docstring)."""
    base = Path(cfg.ledger_dir) / "state" if cfg.ledger_dir else Path(cfg.run_dir) / "site-state"
    return base / run_key(cfg) / f"site-{site_index}.pt"


class SiteState:
    """A site's named arrays per completed round, persisted in one file.

    Parameters
    ----------
    path
        The state file (:func:`site_state_path`); read if it exists.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rounds: dict[int, dict[str, list[np.ndarray]]] = {}
        if self.path.exists():
            try:
                payload = torch.load(self.path, weights_only=True)
                self.rounds = {
                    int(r): {k: [t.numpy() for t in v] for k, v in entries.items()}
                    for r, entries in payload["rounds"].items()
                }
            except Exception as err:
                raise ValueError(
                    f"site state file {self.path} is unreadable ({type(err).__name__}); delete it to start the "
                    "site's state afresh (its local BatchNorm entries and control variate)."
                ) from None

    def before(self, server_round: int) -> dict[str, list[np.ndarray]]:
        """The state saved latest before ``server_round`` (empty for round 1 or none saved)."""
        if server_round <= 1:
            return {}
        earlier = [r for r in self.rounds if r < server_round]
        return dict(self.rounds[max(earlier)]) if earlier else {}

    def save(self, server_round: int, entries: dict[str, list[np.ndarray]]) -> Path:
        """Record ``entries`` as the state after ``server_round`` and write the file atomically.

        Round 1 drops whatever an earlier run left; only the last :data:`KEEP_ROUNDS` rounds
        before and including ``server_round`` are kept.
        """
        if server_round <= 1:
            self.rounds = {}
        self.rounds = {r: v for r, v in self.rounds.items() if r < server_round}
        self.rounds[server_round] = {k: [np.asarray(a).copy() for a in v] for k, v in entries.items()}
        for r in sorted(self.rounds)[:-KEEP_ROUNDS]:
            del self.rounds[r]
        payload: dict[str, Any] = {
            "rounds": {
                str(r): {k: [torch.as_tensor(a) for a in v] for k, v in e.items()} for r, e in self.rounds.items()
            }
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return write_atomically(self.path, lambda fh: fh.write(buffer.getvalue()))
