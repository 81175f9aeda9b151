"""Cross-site evaluation of any checkpoint of a simulated run, on demand (``medfed simulate --cross-site-only``).

The run's own cross-site evaluation happens after its last round, over Flower
(:mod:`medfed.server.cross_site`). This re-runs it for a saved checkpoint (``final.pt``,
``best.pt``) of a simulation: the same simulated sites (the partition the checkpoint's run config
gives: same dataset, ``num-sites``, ``partition``, ``seed``, ``local-test-fraction``), each scoring
the checkpoint on its local test split with the same site code
(:meth:`medfed.client.site_client.SiteClient.evaluate` with ``cross-site = 1``), every metric
name checked against the egress rules, and the same report. The sites run one after another in
this process (no Flower): a simulation's sites are this machine anyway.

The report goes to ``<run_dir>/cross_site.json`` for ``final.pt``, else
``<run_dir>/cross_site_<checkpoint>.json``, and into the run store when the run is in it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from medfed.client.egress import allowed_name
from medfed.client.site_client import SiteClient
from medfed.client.site_data import simulated_site_data
from medfed.server.cross_site import build_report, cross_site_config
from medfed.server.run_dir import write_cross_site_file
from medfed.server.store import RunStore
from medfed.shared.config import RunConfig
from medfed.shared.cross_site import decode_metrics

__all__ = ["cross_site_of_checkpoint"]

logger = logging.getLogger(__name__)


def cross_site_of_checkpoint(checkpoint: str | Path) -> tuple[Path, dict[str, Any]]:
    """Score the checkpoint at every simulated site of its run; write and return the report.

    Parameters
    ----------
    checkpoint
        ``<run_dir>/checkpoints/<name>.pt`` of a simulated (federated) run.

    Returns
    -------
    tuple
        The report's path and its content (the shape of ``cross_site.json``).

    Raises
    ------
    ValueError
        No such file, not a medfed checkpoint, or a deployment run's (its sites hold the data:
        the coordinator's run does the cross-site evaluation there).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise ValueError(
            f"--cross-site-only {path}: no such checkpoint file. Give a run's checkpoint, e.g. "
            "runs/<time>-fedavg-s0/checkpoints/final.pt (or best.pt)."
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        state, stored, server_round = payload["state_dict"], dict(payload["config"]), int(payload["round"])
        metrics = dict(payload.get("metrics") or {})
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(
            f"--cross-site-only {path}: not a medfed checkpoint ({type(err).__name__}); give a run's "
            "checkpoints/final.pt or best.pt."
        ) from None
    cfg = RunConfig.from_mapping(stored, source=f"checkpoint {path}")
    if cfg.is_deployment:
        raise ValueError(
            f"--cross-site-only {path}: a deployment run's checkpoint; its sites hold the data and did "
            "the cross-site evaluation at the end of the run (its cross_site.json)."
        )
    weights = [t.detach().cpu().numpy() for t in state.values()]
    threshold = metrics.get("threshold")
    config = cross_site_config(cfg, threshold=float(threshold) if threshold is not None else None)
    rows = []
    task = "classification"
    for k in range(cfg.num_sites):
        data = simulated_site_data(cfg, site_index=k, num_sites=cfg.num_sites)
        task = data.train.task
        _, _, sent = SiteClient(cfg=cfg, data=data, site_index=k).evaluate(weights, dict(config))
        blocked = [name for name in sent if not allowed_name(name)]
        if blocked:  # the egress guard would block the reply: nothing of it is used
            logger.error("site-%d: %d metric name(s) break the egress rules; the site has no row.", k, len(blocked))
            continue
        result = decode_metrics(sent)
        if result is None or result.n == 0:
            logger.warning("site-%d has no local test split (local-test-fraction = 0?); it has no row.", k)
            continue
        rows.append((f"site-{k}", result))
    report = build_report(
        rows, checkpoint=path.stem, server_round=server_round, task=task, min_count=cfg.cross_site_min_count
    )
    run_path = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    target = write_cross_site_file(run_path, report)
    if cfg.store_url is not None:
        _record(cfg.store_url, run_path.name, report)
    return target, report


def _record(url: str, run_id: str, report: dict[str, Any]) -> None:
    """Add the report to the run store's run ``run_id`` (a warning when the store has no such run)."""
    from medfed.server.dashboard.read_models import RunReader

    with RunStore(url) as store:
        if RunReader(store).get_run(run_id) is None:
            logger.warning("the run store has no run %s: the report is only in the run directory.", run_id)
            return
        store.cross_site(run_id, report)
