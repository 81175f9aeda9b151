"""``medfed report``: a run's model card as one self-contained HTML page (and PDF where possible).

The page (:func:`render_html`) has no external resource: inline CSS, no script, plots as inline
base64 PNG (matplotlib), so it can be mailed, archived, or opened offline; its sections are
:data:`REPORT_SECTIONS`. What it says comes from :func:`medfed.server.model_card.gather_model_card`.
The PDF is printed from the HTML by headless Chromium, else by WeasyPrint; without either, the
command says so and keeps the HTML.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medfed.server.model_card import (
    CLASSIFICATION_METRICS,
    SEGMENTATION_METRICS,
    ModelCard,
    ReportError,
    gather_model_card,
)

__all__ = [
    "NoPdfPrinterError",
    "REPORT_FILE",
    "REPORT_SECTIONS",
    "find_pdf_printer",
    "render_html",
    "write_pdf",
    "write_report",
]

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
"""The report's default name inside the run directory (``medfed report RUN``, the dashboard)."""

REPORT_SECTIONS: tuple[tuple[str, str], ...] = (
    ("intended-use", "Intended use"),
    ("data", "Data per site"),
    ("global-metrics", "Global metrics"),
    ("site-metrics", "Per-site metrics"),
    ("subgroup-metrics", "Per-subgroup metrics"),
    ("calibration", "Calibration"),
    ("fairness", "Fairness gaps"),
    ("privacy", "Privacy spent per site"),
    ("secagg", "Secure aggregation (SecAgg+)"),
    ("recipe", "Strategy and recipe"),
    ("software", "Software and provenance"),
    ("explanations", "Explanation maps"),
)
"""``(id, heading)`` of every section, in page order."""

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

_CSS = """
:root { --ink:#1d2733; --muted:#5b6876; --line:#dde3ea; --soft:#f4f7fa; --accent:#1f5f99; --ok:#1e7b4f;
        --warn:#a35a00; --bad:#b3261e; }
* { box-sizing: border-box; }
body { margin:0; font: 14px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); background: #fff; }
header.card-head { background: linear-gradient(135deg, #16324f, #1f5f99); color: #fff; padding: 28px 0 22px; }
header.card-head .inner { max-width: 1120px; margin: 0 auto; padding: 0 40px; }
header.card-head h1 { margin: 0 0 4px; font-size: 26px; font-weight: 600; letter-spacing: .2px; }
header.card-head .sub { opacity: .85; font-size: 13px; }
header.card-head code { background: rgba(255,255,255,.15); padding: 1px 6px; border-radius: 4px; color: #fff; }
.badge { display:inline-block; padding: 1px 9px; border-radius: 10px; font-size: 12px; font-weight: 600;
         background: #e7edf3; color: var(--ink); vertical-align: 2px; }
.badge.finished { background: #d8f0e3; color: var(--ok); } .badge.failed { background: #fbe0de; color: var(--bad); }
.badge.interrupted, .badge.running { background: #fdecd2; color: var(--warn); }
main { max-width: 1120px; margin: 0 auto; padding: 8px 40px 48px; }
nav.toc { margin: 18px 0 8px; font-size: 13px; color: var(--muted); }
nav.toc a { color: var(--accent); text-decoration: none; margin-right: 12px; white-space: nowrap; line-height: 1.9; }
.kpis { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 12px; margin: 18px 0 6px; }
.kpi { border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; background: var(--soft); }
.kpi .label { font-size: 11px; text-transform: uppercase; letter-spacing: .6px; color: var(--muted); }
.kpi .value { font-size: 22px; font-weight: 600; margin-top: 2px; }
.kpi .sub { font-size: 12px; color: var(--muted); }
section { border-top: 1px solid var(--line); padding: 18px 0 6px; page-break-inside: avoid; }
h2 { font-size: 18px; margin: 0 0 10px; color: #16324f; }
h3 { font-size: 14px; margin: 14px 0 6px; color: var(--ink); }
p.note { color: var(--muted); margin: 6px 0 10px; }
.warning { border-left: 4px solid var(--warn); background: #fff7eb; padding: 8px 12px; margin: 10px 0; }
table { border-collapse: collapse; width: 100%; margin: 6px 0 12px; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 8px; text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; color: #33414f; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.kv td:first-child { width: 34%; color: var(--muted); }
.mix { display: inline-flex; height: 12px; width: 160px; border-radius: 3px; overflow: hidden; vertical-align: -1px;
       border: 1px solid var(--line); margin-right: 6px; }
.mix span { display: block; height: 100%; }
.legend { font-size: 12px; color: var(--muted); margin: -4px 0 8px; }
.legend i { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin: 0 4px 0 10px; vertical-align: -1px; }
table.kv4 td:nth-child(odd) { color: var(--muted); width: 22%; } table.kv4 td:nth-child(even) { width: 28%; }
.figure { text-align: center; margin: 8px 0 14px; }
.figure img { max-width: 100%; border: 1px solid var(--line); border-radius: 6px; }
.figure .caption { font-size: 12px; color: var(--muted); }
.maps { display: grid; grid-template-columns: repeat(auto-fill, minmax(160px, 1fr)); gap: 12px; }
.maps figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 6px; text-align: center; }
.maps img { width: 100%; image-rendering: pixelated; }
.maps figcaption { font-size: 12px; color: var(--muted); }
code { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 12px; }
.hash { word-break: break-all; }
details summary { cursor: pointer; color: var(--accent); margin: 6px 0; }
footer { color: var(--muted); font-size: 12px; border-top: 1px solid var(--line); padding-top: 10px; margin-top: 20px; }
@page { size: A4; margin: 14mm 12mm; }
@media print { header.card-head { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
               nav.toc { display: none; } main { padding: 0 8px; } section { page-break-inside: auto; } }
"""

class NoPdfPrinterError(ReportError):
    """Neither Chromium nor WeasyPrint is installed."""


_MIX_COLOURS = ("#1f5f99", "#e07b39", "#3a9d5d", "#b94a7c", "#7a5bb3", "#c9a227", "#3aa6b9", "#8c6d51")


# --------------------------------------------------------------------------- small formatters
def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(value: object, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _e(value)


def _value(value: object) -> str:
    """A config value as TOML writes it (``true``, not ``True``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return _e(value)


def _count(value: object) -> str:
    return "–" if value is None else f"{float(value):,.0f}"  # type: ignore[arg-type]


def _sci(value: object) -> str:
    return "–" if value is None else f"{float(value):g}"  # type: ignore[arg-type]


def _table(head: Iterable[str], rows: Iterable[Iterable[str]], *, numeric_from: int = 1, cls: str = "") -> str:
    head = list(head)
    ths = "".join(f'<th class="num">{h}</th>' if i >= numeric_from else f"<th>{h}</th>" for i, h in enumerate(head))
    body = []
    for row in rows:
        tds = "".join(f'<td class="num">{c}</td>' if i >= numeric_from else f"<td>{c}</td>" for i, c in enumerate(row))
        body.append(f"<tr>{tds}</tr>")
    return f'<table class="{cls}"><thead><tr>{ths}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>' if text else ""


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(png: str, caption: str, *, alt: str) -> str:
    return (f'<div class="figure"><img alt="{_e(alt)}" src="data:image/png;base64,{png}">'
            f'<div class="caption">{_e(caption)}</div></div>')


# --------------------------------------------------------------------------- plots
def _plot_curve(card: ModelCard) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 2.6))
    rounds, values = zip(*card.curve, strict=True)
    ax.plot(rounds, values, marker="o", color="#1f5f99", lw=1.8, ms=4)
    ax.set_xlabel("round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(card.primary_metric)
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def _plot_reliability(bins: Any) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hist) = plt.subplots(2, 1, figsize=(4.0, 4.0), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    centres = [(a + b) / 2 for a, b in zip(bins.edges[:-1], bins.edges[1:], strict=True)]
    width = bins.edges[1] - bins.edges[0]
    observed = [0.0 if math.isnan(v) else v for v in bins.observed]
    ax.bar(centres, observed, width=width * 0.92, color="#1f5f99", alpha=0.85, label="observed")
    ax.plot([0, 1], [0, 1], ls="--", color="#888", lw=1, label="perfect calibration")
    ax.set_ylabel("observed frequency")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.set_title(f"ECE {bins.ece:.3f}", fontsize=10)
    hist.bar(centres, bins.counts, width=width * 0.92, color="#9bb7d1")
    hist.set_xlabel(bins.kind)
    hist.set_ylabel("samples")
    for axis in (ax, hist):
        axis.spines[["top", "right"]].set_visible(False)
    return _png(fig)


# --------------------------------------------------------------------------- sections
def _metric_head(names: tuple[str, ...]) -> list[str]:
    return [_e(n) for n in names]


def _names(card: ModelCard) -> tuple[str, ...]:
    return SEGMENTATION_METRICS if card.task == "segmentation" else CLASSIFICATION_METRICS


def _section_intended_use(card: ModelCard) -> str:
    source = f" (from {card.intended_use_source})" if card.intended_use_source else ""
    return (
        f"<p>{_e(card.intended_use)}</p>"
        + _note(f"Stated{source}." if source else "")
        + '<p class="note">Out of scope: any use on a population, device or protocol unlike the sites below '
        "without local validation; this card reports retrospective figures on the sites' held-out data, not a "
        "prospective clinical evaluation.</p>"
    )


def _mix_bar(mix: list[int]) -> str:
    total = sum(mix) or 1
    spans = "".join(
        f'<span title="class {c}: {n}" style="width:{100 * n / total:.1f}%;background:{_MIX_COLOURS[c % len(_MIX_COLOURS)]}"></span>'
        for c, n in enumerate(mix) if n
    )
    return f'<span class="mix">{spans}</span>'


def _section_data(card: ModelCard) -> str:
    if not card.data_sites:
        return _note("No site has reported yet.") + _note(card.data_note)
    has_mix = any(row.get("class_mix") for row in card.data_sites)
    head = ["Site", "Trained on (last round)", "Validation examples"]
    if has_mix:
        head += ["Class mix (train)", "Train by class", "Validation by class"]
    rows = []
    for row in card.data_sites:
        cells = [_e(row["site"]), _count(row.get("train")), _count(row.get("val"))]
        if has_mix:
            mix = row.get("class_mix") or {}
            train = mix.get("train") or []
            cells += [
                _mix_bar(train) if train else "–",
                " / ".join(str(n) for n in train) or "–",
                " / ".join(str(n) for n in mix.get("val") or []) or "–",
            ]
        rows.append(cells)
    dataset = f"Dataset: <code>{_e(card.dataset)}</code>. " if card.dataset else ""
    legend = ""
    if has_mix:
        classes = max(len((row.get("class_mix") or {}).get("train") or []) for row in card.data_sites)
        legend = '<div class="legend">class mix:' + "".join(
            f'<i style="background:{_MIX_COLOURS[c % len(_MIX_COLOURS)]}"></i>class {c}' for c in range(classes)
        ) + "</div>"
    return (f"<p>{dataset}Counts and class mix only: no image, identifier or file name leaves a site.</p>"
            + _table(head, rows, numeric_from=1) + legend + _note(card.data_note))


def _section_global(card: ModelCard) -> str:
    names = _names(card)
    out = "".join(f'<div class="warning">{_e(w)}</div>' for w in card.warnings if "single class" in w)
    if card.global_rows:
        head = ["Model", "Round", "Split", "n", *_metric_head(names)]
        rows = []
        for row in card.global_rows:
            label = row["model"] + (f" (by {row['selected_by']})" if row.get("selected_by") else "")
            rows.append([_e(label), _e(row["round"]), _e(row["split"]), _count(row["n"]),
                         *(_num(row["metrics"].get(n)) for n in names)])
        out += _table(head, rows, numeric_from=3)
        if "threshold" in names:
            out += _note("Binary decisions use the class-1 probability threshold chosen on validation data "
                         "(Youden's J), never on the test split; sensitivity and specificity are at that threshold.")
    out += _note(card.global_note)
    if card.curve:
        out += _figure(_plot_curve(card), f"{card.primary_metric} per round ({card.curve_source})",
                       alt=f"{card.primary_metric} per round")
    return out


def _section_sites(card: ModelCard) -> str:
    names = _names(card)
    out = ""
    if card.cross_site is not None:
        rows = []
        for site in card.cross_site.get("sites", []):
            metrics = site.get("metrics", {})
            rows.append([_e(site.get("site")), _count(site.get("n")), *(_num(metrics.get(n)) for n in names)])
        out += (f"<h3>Test split per site (cross-site evaluation, {_e(card.cross_site.get('checkpoint', 'final'))} "
                f"model, round {_e(card.cross_site.get('round', '?'))})</h3>")
        out += _table(["Site", "n", *_metric_head(names)], rows)
    else:
        out += _note(card.cross_site_note)
    if card.site_rows:
        rows = []
        has_local = any("local_test" in r for r in card.site_rows)
        for row in card.site_rows:
            cells = [_e(row["site"]), _e(row["round"]), _count(row["n"]), *(_num(row["metrics"].get(n)) for n in names)]
            if has_local:
                local = row.get("local_test") or {}
                cells += [_num(local.get("global")), _num(local.get("personalized"))]
            rows.append(cells)
        head = ["Site", "Round", "n", *_metric_head(names)]
        if has_local:
            head += [f"local test {_e(card.primary_metric)}: global", "personalized"]
        out += "<h3>Each site's validation split (last round it evaluated; its own threshold)</h3>"
        out += _table(head, rows, numeric_from=1)
    else:
        out += _note(card.site_note)
    return out


def _section_subgroups(card: ModelCard) -> str:
    if card.cross_site is None:
        return _note("Not run: the cross-site evaluation (cross_site.json) has not been run on this run.")
    groups = [g for site in card.cross_site.get("sites", []) for g in site.get("subgroups", [])]
    names = tuple(n for n in _names(card) if any(n in g.get("metrics", {}) for g in groups)) or _names(card)
    rows, suppressed = [], 0
    for site in card.cross_site.get("sites", []):
        suppressed += int(site.get("suppressed") or 0)
        for group in site.get("subgroups", []):
            metrics = group.get("metrics", {})
            rows.append([_e(site.get("site")), _e(group.get("key")), _e(group.get("value")), _count(group.get("n")),
                         *(_num(metrics.get(n)) for n in names)])
    min_count = card.cross_site.get("min_count")
    note = (f"Subgroups with fewer than {min_count} examples are suppressed ({suppressed} suppressed): "
            "too small to report without identifying patients." if min_count is not None else "")
    if not rows:
        return _note("The cross-site evaluation reported no subgroup (the sites' data carry no subgroup "
                     "attributes, or every subgroup was below the minimum count).") + _note(note)
    return _table(["Site", "Attribute", "Value", "n", *_metric_head(names)], rows, numeric_from=3) + _note(note)


def _section_calibration(card: ModelCard) -> str:
    if card.calibration is None:
        return _note(card.calibration_note)
    bins = card.calibration["bins"]
    table = _table(
        ["Measure", "Value"],
        [["Expected calibration error (ECE, 10 bins)", _num(bins.ece)],
         ["Maximum calibration error (MCE)", _num(bins.mce)],
         ["Brier score", _num(bins.brier)],
         ["Examples (test split)", _count(bins.num_examples)],
         ["Score", _e(bins.kind)]],
        cls="kv",
    )
    caption = (f"Reliability diagram of the final model (round {card.calibration['round']}) on the "
               f"{card.calibration['split']} split: bars on the diagonal are perfectly calibrated.")
    return table + _figure(_plot_reliability(bins), caption, alt="reliability diagram")


def _section_fairness(card: ModelCard) -> str:
    out = ""
    gaps = (card.cross_site or {}).get("gaps", [])
    if gaps:
        rows = [[_e(g.get("key")), _e(g.get("metric")), f"{_e(g.get('best_value'))} ({_num(g.get('best'))})",
                 f"{_e(g.get('worst_value'))} ({_num(g.get('worst'))})", _num(g.get("gap"))] for g in gaps]
        out += "<h3>Between subgroups (cross-site evaluation)</h3>"
        out += _table(["Attribute", "Metric", "Best", "Worst", "Gap"], rows, numeric_from=4)
    elif card.cross_site is None:
        out += _note("Subgroup gaps: not run (no cross-site evaluation).")
    else:
        out += _note("Subgroup gaps: none reported (fewer than two reportable subgroups per attribute).")
    if card.site_gap:
        g = card.site_gap
        out += "<h3>Between sites (validation, last round)</h3>"
        out += _table(["Metric", "Best site", "Worst site", "Gap"],
                      [[_e(g["metric"]), f"{_e(g['best_site'])} ({_num(g['best'])})",
                        f"{_e(g['worst_site'])} ({_num(g['worst'])})", _num(g["gap"])]], numeric_from=3)
    else:
        out += _note("Between sites: fewer than two sites reported validation metrics.")
    return out


def _section_privacy(card: ModelCard) -> str:
    out = _note(card.privacy_note)
    if card.privacy_sites:
        rows = [[_e(s["site"]), _num(s.get("epsilon")), _num(s.get("budget"), 2), _sci(s.get("delta")),
                 _num(s.get("noise"), 2), _num(s.get("sample_rate")), _e(s["rounds"]), _e(s["declined"])]
                for s in card.privacy_sites]
        out += "<h3>Sample-level DP-SGD (each site's ledger)</h3>"
        out += _table(["Site", "ε spent", "ε budget", "δ", "Noise multiplier", "Sample rate", "Rounds trained",
                       "Rounds declined"], rows)
        sites = [s["site"] for s in card.privacy_sites]
        ledger = [[_e(r["round"]), *(
            (_num(r["sites"][s]["epsilon"]) + (" (declined)" if r["sites"][s]["declined"] else ""))
            if s in r["sites"] else "–" for s in sites)] for r in card.privacy_ledger]
        out += ("<details><summary>Privacy ledger: cumulative ε per round, as each site reported it</summary>"
                + _table(["Round", *(_e(s) for s in sites)], ledger) + "</details>")
    if card.client_dp:
        last = card.client_dp[-1]
        out += "<h3>Client-level DP (server-side accountant)</h3>"
        out += _table(["Rounds released", "ε", "δ", "Noise multiplier"],
                      [[_e(last["round"]), _num(last["epsilon"]), _sci(last["delta"]), _num(last["noise"], 2)]],
                      numeric_from=0)
    return out


def _section_secagg(card: ModelCard) -> str:
    s = card.secagg
    if not s.get("enabled"):
        return _note("Off (secagg = false): the server saw each site's model update in the clear.")
    rows = [["Status", "on: the server saw only the sum of the sites' updates"],
            ["Rounds aggregated securely", f"{s['completed']} of {s['rounds']}"],
            ["Sites dropped during SecAgg+ (all rounds)", _e(s["dropped"])]]
    rows += [[_e(k), _e(v)] for k, v in s.get("settings", {}).items()]
    out = _table(["", ""], rows, numeric_from=9, cls="kv")
    if s["failed"]:
        out += _note("Rounds whose secure aggregation failed (model unchanged): " + ", ".join(
            f"round {f['round']} at {f['stage'] or 'an unknown stage'}" for f in s["failed"]))
    return out


def _section_recipe(card: ModelCard) -> str:
    rows = [[f"<code>{_e(k)}</code>", _value(v)] for k, v in card.recipe]
    dp = card.config
    if dp.get("dp"):
        rows.append(["<code>dp</code>", _e(f"true (noise {dp.get('dp-noise-multiplier')}, clip {dp.get('dp-max-grad-norm')}, "
                                            f"target ε {dp.get('dp-target-epsilon')}, δ {dp.get('dp-delta')})")])
    full = _table(["Key", "Value"], ([f"<code>{_e(k)}</code>", _value(v)] for k, v in sorted(card.config.items())
                                     if k != "app-signature"), numeric_from=9, cls="kv")
    pairs = [rows[i : i + 2] for i in range(0, len(rows), 2)]
    grid = "".join("<tr>" + "".join(f"<td>{k}</td><td>{v}</td>" for k, v in pair) + "</tr>" for pair in pairs)
    return (f'<table class="kv4"><tbody>{grid}</tbody></table>'
            + f"<details><summary>Full run config ({len(card.config)} keys; data paths reduced to file names)</summary>"
            f"{full}</details>")


def _section_software(card: ModelCard) -> str:
    rows = [[_e(k), f"<code>{_e(v)}</code>"] for k, v in sorted(card.versions.items())]
    bundle = card.app_bundle
    if bundle.get("fab_sha256"):
        value = f'<code class="hash">sha256:{_e(bundle["fab_sha256"])}</code>'
        value += " (signed by the coordinator; every site verified it)" if bundle.get("signed") else " (unsigned)"
    else:
        value = _e(bundle.get("note", ""))
    rows.append(["App bundle", value])
    init = card.init_weights
    if init:
        new = f"; newly initialised: {', '.join(init['new'][:4])}" if init.get("new") else ""
        rows.append(["Initial weights", f"{_e(init['file'])} ({_e(init['kind'])}), "
                     f'<code class="hash">sha256:{_e(init["sha256"])}</code>, '
                     f"{init['loaded_parameters']:,} of {init['model_parameters']:,} parameters loaded{_e(new)}"])
    else:
        rows.append(["Initial weights", "random initialisation (no init-weights)"])
    return _table(["Component", "Version"], rows, numeric_from=9, cls="kv")


def _section_explanations(card: ModelCard) -> str:
    missing = "".join(f'<div class="warning">{_e(w)}</div>' for w in card.warnings if w.startswith("explanation map"))
    if not card.explanations:
        return missing + _note(card.explanations_note)
    figures = []
    for item in card.explanations:
        prob = f", p = {item['probability']:.2f}" if item.get("probability") is not None else ""
        explained = item.get("explained")
        target = f" · map of class {_e(explained)}" if explained is not None and explained != item.get("predicted") else ""
        caption = (f"#{_e(item.get('index'))}: predicted {_e(item.get('predicted'))}{prob}{target} · "
                   f"{_e(item.get('method'))}")
        figures.append(f'<figure><img alt="explanation map {_e(item.get("index"))}" '
                       f'src="data:image/png;base64,{item["png_base64"]}"><figcaption>{caption}</figcaption></figure>')
    return (_note("Maps a site chose to share (it ran `medfed explain` on its own data).")
            + f'<div class="maps">{"".join(figures)}</div>' + missing + _note(card.explanations_note))


_RENDERERS = {
    "intended-use": _section_intended_use,
    "data": _section_data,
    "global-metrics": _section_global,
    "site-metrics": _section_sites,
    "subgroup-metrics": _section_subgroups,
    "calibration": _section_calibration,
    "fairness": _section_fairness,
    "privacy": _section_privacy,
    "secagg": _section_secagg,
    "recipe": _section_recipe,
    "software": _section_software,
    "explanations": _section_explanations,
}


def _kpis(card: ModelCard) -> str:
    final = next((r for r in card.global_rows if r["model"] == "final"), None)
    selected = next((r for r in card.global_rows if r["model"] == "selected"), None)
    eps = [s["epsilon"] for s in card.privacy_sites if s.get("epsilon") is not None]
    items = [
        (f"Final {card.primary_metric}", _num(final["metrics"].get(card.primary_metric)) if final else "–",
         f"round {final['round']}, {final['split']}" if final else ""),
        (f"Selected {card.primary_metric}", _num(selected["metrics"].get(card.primary_metric)) if selected else "–",
         f"round {selected['round']}" if selected else ""),
        ("Sites", str(len(card.data_sites)) if card.data_sites else "–", card.mode),
        ("Rounds", f"{card.rounds if card.rounds is not None else '–'} / {card.planned_rounds or '–'}", card.status),
        ("Privacy spent", f"ε {_num(max(eps), 2)}" if eps else "–",
         "most spent by a site (DP-SGD)" if eps else "no sample-level DP"),
        ("SecAgg+", "on" if card.secagg.get("enabled") else "off", ""),
    ]
    return '<div class="kpis">' + "".join(
        f'<div class="kpi"><div class="label">{_e(label)}</div><div class="value">{value}</div>'
        f'<div class="sub">{_e(sub)}</div></div>' for label, value, sub in items) + "</div>"


def render_html(card: ModelCard, *, generated: float | None = None) -> str:
    """The model card as one self-contained HTML page (sections :data:`REPORT_SECTIONS`)."""
    generated = time.time() if generated is None else generated
    when = datetime.fromtimestamp(generated, UTC).strftime("%Y-%m-%d %H:%M UTC")
    started = datetime.fromtimestamp(card.started, UTC).strftime("%Y-%m-%d %H:%M UTC") if card.started else "–"
    model = card.config.get("model", "?")
    strategy = card.config.get("strategy", "?")
    sections = "".join(
        f'<section id="{sid}"><h2>{_e(title)}</h2>{_RENDERERS[sid](card)}</section>' for sid, title in REPORT_SECTIONS
    )
    toc = " ".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title in REPORT_SECTIONS)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="medfed {_e(card.versions.get('medfed', ''))}">
<title>Model card: {_e(card.run_id)}</title>
<link rel="icon" href="data:,">
<style>{_CSS}</style>
</head>
<body>
<header class="card-head"><div class="inner">
  <h1>Model card <span class="badge {_e(card.status)}">{_e(card.status)}</span></h1>
  <div class="sub">Run <code>{_e(card.run_id)}</code> · {_e(model)} trained with {_e(strategy)} ({_e(card.mode)},
  {_e(card.task)}) · started {_e(started)} · report generated {_e(when)}</div>
</div></header>
<main>
<nav class="toc">{toc}</nav>
{_kpis(card)}
{sections}
<footer>Generated by <code>medfed report</code> from the run directory. Aggregate figures only: no images, patient
identifiers or data paths.</footer>
</main>
</body>
</html>
"""


# --------------------------------------------------------------------------- files
def write_report(
    run: str | Path,
    *,
    out: str | Path | None = None,
    intended_use: str | None = None,
    explanations: str | Path | None = None,
    dataset: str | None = None,
    calibrate: bool = True,
) -> Path:
    """Gather ``run``'s model card and write it as HTML to ``out`` (default ``<run>/report.html``).

    Raises
    ------
    ReportError
        As :func:`~medfed.server.model_card.gather_model_card`.
    """
    card = gather_model_card(run, intended_use=intended_use, explanations=explanations, dataset=dataset,
                             calibrate=calibrate)
    target = Path(out) if out is not None else Path(run) / REPORT_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    from medfed.shared.files import write_atomically

    text = render_html(card)
    write_atomically(target, lambda fh: fh.write(text.encode("utf-8")), mode=0o644)
    return target


def find_pdf_printer() -> tuple[str, str] | None:
    """``("chromium", path)`` or ``("weasyprint", "")`` for the first PDF printer found; ``None`` if none."""
    for candidate in CHROMIUM_CANDIDATES:
        found = candidate if os.path.isabs(candidate) and os.access(candidate, os.X_OK) else shutil.which(candidate)
        if found:
            return "chromium", found
    try:
        import weasyprint  # noqa: F401
    except ImportError:
        return None
    return "weasyprint", ""


def write_pdf(html_file: str | Path, pdf_file: str | Path, *, timeout: float = 120.0) -> str:
    """Print ``html_file`` to ``pdf_file``; return which printer did it.

    Raises
    ------
    ReportError
        Printing failed; :class:`NoPdfPrinterError` when no printer is installed (the message
        says what to install).
    """
    printer = find_pdf_printer()
    html_file, pdf_file = Path(html_file).resolve(), Path(pdf_file).resolve()
    if printer is None:
        raise NoPdfPrinterError(
            "no PDF printer found: install Chromium (`apt-get install chromium`) or WeasyPrint "
            "(`pip install weasyprint`). The HTML report is complete without it."
        )
    kind, exe = printer
    if kind == "weasyprint":
        import weasyprint

        weasyprint.HTML(filename=str(html_file)).write_pdf(str(pdf_file))
        return "weasyprint"
    with tempfile.TemporaryDirectory(prefix="medfed-pdf-") as profile:
        command = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   f"--user-data-dir={profile}", "--no-pdf-header-footer",
                   f"--print-to-pdf={pdf_file}", html_file.as_uri()]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise ReportError(f"Chromium did not print the PDF within {timeout:.0f} s.") from None
    if proc.returncode != 0 or not pdf_file.exists() or pdf_file.stat().st_size == 0:
        raise ReportError(f"Chromium could not print the PDF (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
    return "chromium"
