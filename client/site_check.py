"""``medfed site check``: read a site's datalist locally and report what is in it and what is wrong.

Nothing is contacted: the check reads the datalist and every image (and mask) with the same
reader the training uses (:func:`medfed.shared.data.datalist.scan_datalist`) and reports

* counts per split and per class (classification) or mask presence (segmentation),
* image shapes, orientations and spacings (from the file headers) and how many files share each,
  and every image's own (stored orientation codes such as ``RAS`` / ``LPS``, spacing in mm,
  corrections made while reading a DICOM series); mixtures are flagged (every NIfTI/DICOM volume
  is loaded in RAS, and resampled to ``spacing`` when the site or run sets one),
* every unusable entry by name: missing file, corrupt or unreadable file, label out of range,
  mask that does not match its image, inconsistent shapes, dimensions or channels,
* label inconsistencies: the same image listed twice with different labels, labels above the
  federation's ``num-classes``, classes absent from a split,
* what training will do about the unusable entries: with ``bad-data = "strict"`` the site
  refuses to train; with ``"skip"`` it leaves exactly these entries out and reports their count
  as ``skipped-files`` (the same count, from the same reader).

With a proposed run config (``medfed site check --run-config run.toml``) it is also the site's
dry run of that run against its privacy policy (:func:`check_run_policy`): the same check the
site's ClientApp makes before training (:func:`medfed.client.site_policy.check_run`), with the
noise multiplier the site would derive for its own number of training entries.

The report names files: it is for the site's operator and stays on the site.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from medfed.client.site_policy import SitePolicy, Violation, check_run
from medfed.shared.config import RunConfig
from medfed.shared.data.base import DataError
from medfed.shared.data.datalist import SECTIONS, DatalistReport, EntryInfo, scan_datalist
from medfed.shared.privacy import planned_noise_multiplier, poisson_schedule_for

__all__ = [
    "Finding",
    "PolicyCheck",
    "SiteCheckReport",
    "check_run_policy",
    "check_site",
    "format_policy",
    "format_report",
    "training_entries",
]

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    """One problem found in the datalist.

    Parameters
    ----------
    severity
        ``"error"``: the entry (or the datalist) cannot be used. ``"warning"``: usable but
        suspicious.
    kind
        Short category (``missing_file``, ``unreadable``, ``label_out_of_range``,
        ``shape_mismatch``, ``inconsistent_shape``, ``conflicting_labels``, ...).
    where
        ``"training[3]"`` or ``"datalist"``.
    file
        The file concerned, as written in the datalist (``""`` if none).
    message
        What is wrong and how to fix it.
    training
        Whether training finds it too: the entry is left out under ``bad-data = "skip"`` (and
        counted in ``skipped-files``) and makes the site refuse under ``"strict"``.
    """

    severity: Severity
    kind: str
    where: str
    file: str
    message: str
    training: bool = False


@dataclass
class SiteCheckReport:
    """Result of :func:`check_site`."""

    datalist: str
    task: str | None = None
    spatial_dims: int | None = None
    num_classes: int = 0
    entries_total: int = 0
    entries_ok: int = 0
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    shapes: dict[str, int] = field(default_factory=dict)
    spacings: dict[str, int] = field(default_factory=dict)
    orientations: dict[str, int] = field(default_factory=dict)
    channels: dict[str, int] = field(default_factory=dict)
    images: list[dict[str, object]] = field(default_factory=list)
    spacing: list[float] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    bad_data: str = ""
    skipped_files: int = 0

    @property
    def errors(self) -> list[Finding]:
        """Findings that make entries (or the datalist) unusable."""
        return [f for f in self.findings if f.severity == "error"]

    @property
    def ok(self) -> bool:
        """No errors (warnings allowed)."""
        return not self.errors

    def to_json(self) -> str:
        """The report as JSON (for scripts)."""
        return json.dumps({**asdict(self), "ok": self.ok}, indent=2)


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def _fmt_spacing(spacing: tuple[float, ...] | None) -> str:
    if spacing is None:
        return "none"
    return " x ".join(f"{v:.3g}" for v in spacing)


def check_site(
    datalist: str | Path,
    *,
    image_size: int = 0,
    num_classes: int = 0,
    bad_data: str = "",
    spacing: tuple[float, ...] = (),
) -> SiteCheckReport:
    """Check a site's datalist without contacting anyone.

    Parameters
    ----------
    datalist
        The site's datalist JSON.
    image_size
        Side length the run resizes images to; ``0``: images must all have one size (then a
        different size is an error, otherwise a warning).
    num_classes
        The federation's ``num-classes``; labels (mask values) at or above it are errors.
        ``0``: use the datalist's own ``num_classes`` only.
    bad_data
        The site's ``bad-data`` (``"strict"``, ``"skip"`` or ``""`` for the run's); the report
        says what training will do with the unusable entries.
    spacing
        The voxel size (mm) training resamples NIfTI/DICOM images to (the site's ``spacing``,
        else the run's); ``()``: native spacing.

    Returns
    -------
    SiteCheckReport
        Counts, shapes, spacings and findings; ``skipped_files`` is the number of entries
        training leaves out under ``bad-data = "skip"``.
    """
    path = Path(datalist).expanduser()
    report = SiteCheckReport(datalist=str(path), bad_data=bad_data, spacing=list(spacing))
    try:
        scan = scan_datalist(path, image_size=image_size, spacing=spacing)
    except DataError as err:
        report.findings.append(Finding("error", "datalist", "datalist", str(path), str(err)))
        return report
    _fill(report, scan, image_size=image_size, num_classes=num_classes)
    report.skipped_files = len({f.where for f in report.findings if f.training})
    return report


def _fill(report: SiteCheckReport, scan: DatalistReport, *, image_size: int, num_classes: int) -> None:
    report.task, report.spatial_dims, report.num_classes = scan.task, scan.spatial_dims, scan.num_classes
    report.entries_total, report.entries_ok = scan.entries_total, scan.entries_ok
    for problem in scan.problems:
        report.findings.append(
            Finding("error", problem.kind, problem.where, problem.file, problem.reason, training=True)
        )

    entries = scan.entries
    report.shapes = dict(Counter(_fmt_shape(e.shape) for e in entries).most_common())
    report.spacings = dict(Counter(_fmt_spacing(e.spacing) for e in entries).most_common())
    report.channels = dict(Counter(str(e.channels) for e in entries).most_common())
    _count_splits(report, entries)
    _geometry(report, entries)

    # Shapes that differ from the most common one (an error already when image_size == 0).
    if image_size and len(report.shapes) > 1:
        common = next(iter(report.shapes))
        for e in entries:
            if _fmt_shape(e.shape) != common:
                report.findings.append(Finding(
                    "warning", "inconsistent_shape", f"{e.section}[{e.index}]", e.file,
                    f"image {e.file!r} has size {_fmt_shape(e.shape)} while most images have {common}; "
                    f"it will be resized to {image_size} per side. Check it is the right image.",
                ))
    if len(report.spacings) > 1:
        common_spacing = next(iter(report.spacings))
        fix = (
            f"training resamples NIfTI/DICOM images to {_fmt_spacing(tuple(report.spacing))} mm (spacing)"
            if report.spacing
            else 'set spacing in site.toml (e.g. spacing = "1.0") to resample NIfTI/DICOM images to one voxel size'
        )
        for e in entries:
            if _fmt_spacing(e.spacing) != common_spacing:
                report.findings.append(Finding(
                    "warning", "inconsistent_spacing", f"{e.section}[{e.index}]", e.file,
                    f"image {e.file!r} has spacing {_fmt_spacing(e.spacing)} while most images have "
                    f"{common_spacing}: {fix}.",
                ))

    # Labels: above the federation's classes, conflicting duplicates, classes absent from a split.
    for e in entries:
        values = [e.label] if e.label is not None else list(e.mask_classes)
        if num_classes and any(v >= num_classes for v in values):
            report.findings.append(Finding(
                "error", "label_out_of_range", f"{e.section}[{e.index}]", e.file,
                f"{e.file!r} has label(s) {sorted(v for v in values if v >= num_classes)} but the "
                f"federation's model has num-classes = {num_classes} (classes 0..{num_classes - 1}).",
                training=True,  # deployment reads the datalist with the run's num-classes
            ))
    by_file: dict[str, list[EntryInfo]] = defaultdict(list)
    for e in entries:
        by_file[e.file].append(e)
    for file, group in by_file.items():
        if len(group) < 2:
            continue
        where = ", ".join(f"{e.section}[{e.index}]" for e in group)
        labels = {e.label for e in group} if group[0].label is not None else set()
        if len(labels) > 1:
            report.findings.append(Finding(
                "error", "conflicting_labels", where, file,
                f"{file!r} is listed {len(group)} times with different labels {sorted(labels)}. Keep one entry with the right label.",
            ))
        else:
            report.findings.append(Finding(
                "warning", "duplicate_entry", where, file,
                f"{file!r} is listed {len(group)} times; a duplicate counts twice (and may leak "
                "between training and validation).",
            ))
    if report.task == "classification" and report.num_classes:
        classes = range(max(report.num_classes, num_classes))
        for section, counts in report.splits.items():
            missing = [c for c in classes if counts.get(f"class {c}", 0) == 0]
            if missing and counts.get("entries", 0):
                report.findings.append(Finding(
                    "warning", "missing_class", section, "",
                    f"{section} has no example of class(es) {missing}: this site cannot learn or "
                    "validate them (fine if the site truly has none).",
                ))


def _geometry(report: SiteCheckReport, entries: list[EntryInfo]) -> None:
    """Every image's stored orientation and spacing; a mixture of orientations; DICOM corrections."""
    report.orientations = dict(Counter(e.orientation or "as stored" for e in entries).most_common())
    for e in entries:
        report.images.append({
            "where": f"{e.section}[{e.index}]",
            "file": e.file,
            "shape": _fmt_shape(e.shape),
            "orientation": e.orientation,
            "spacing": list(e.spacing) if e.spacing is not None else None,
            "notes": list(e.notes),
        })
        if e.notes:
            report.findings.append(Finding(
                "warning", "dicom_corrected", f"{e.section}[{e.index}]", e.file,
                f"DICOM series {e.file!r} was corrected while reading: {'; '.join(e.notes)}. Check the volume "
                "looks right (or re-export it untilted / with even slices from the scanner or PACS).",
            ))
    pictures = [e for e in entries if e.file.lower().endswith((".png", ".jpg", ".jpeg"))]
    if report.spacing and pictures:
        report.findings.append(Finding(
            "warning", "spacing_not_applied", "datalist", "",
            f"spacing is set but {len(pictures)} PNG/JPEG image(s) carry no physical pixel size: they are used "
            "as stored (only NIfTI/DICOM images are resampled). Convert them to NIfTI/DICOM with their "
            "spacing if the scale matters.",
        ))
    if len(report.orientations) > 1:
        common = next(iter(report.orientations))
        for e in entries:
            stored = e.orientation or "as stored"
            if stored != common:
                loaded = "loaded in RAS like every NIfTI/DICOM volume" if e.orientation else (
                    "PNG/JPEG and 2D DICOM have no patient axes and are used as stored"
                )
                report.findings.append(Finding(
                    "warning", "mixed_orientation", f"{e.section}[{e.index}]", e.file,
                    f"image {e.file!r} is stored {stored} while most images are {common}: {loaded}. Check "
                    "that it shows the same anatomy the same way up.",
                ))


def _count_splits(report: SiteCheckReport, entries: list[EntryInfo]) -> None:
    for section in SECTIONS:
        chosen = [e for e in entries if e.section == section]
        if not chosen:
            continue
        counts: dict[str, int] = {"entries": len(chosen)}
        for e in chosen:
            if e.label is not None:
                key = f"class {e.label}"
                counts[key] = counts.get(key, 0) + 1
            else:
                key = "with foreground" if any(c > 0 for c in e.mask_classes) else "background only"
                counts[key] = counts.get(key, 0) + 1
        report.splits[section] = dict(sorted(counts.items(), key=lambda kv: (kv[0] != "entries", kv[0])))


def format_report(report: SiteCheckReport) -> str:
    """Plain-text report for the site's operator (names files; stays on the site)."""
    lines = [f"datalist: {report.datalist}"]
    if report.task:
        lines.append(
            f"task: {report.task}, {report.spatial_dims}D, {report.num_classes} classes; "
            f"{report.entries_ok} of {report.entries_total} entries usable"
        )
    for section, counts in report.splits.items():
        detail = ", ".join(f"{k}: {v}" for k, v in counts.items() if k != "entries")
        lines.append(f"  {section}: {counts['entries']} entries ({detail})")
    if report.shapes:
        lines.append("shapes: " + ", ".join(f"{k} ({v})" for k, v in report.shapes.items()))
    if report.spacings:
        lines.append("spacings: " + ", ".join(f"{k} ({v})" for k, v in report.spacings.items()))
    if report.orientations:
        lines.append("orientations: " + ", ".join(f"{k} ({v})" for k, v in report.orientations.items()))
    if report.images:
        target = f", resampled to {_fmt_spacing(tuple(report.spacing))} mm" if report.spacing else ""
        lines.append(f"images (as stored: shape, orientation, spacing in mm; NIfTI/DICOM loaded in RAS{target}):")
        for image in report.images:
            spacing = image["spacing"]
            notes = image["notes"]
            lines.append(
                f"  {image['where']} {image['file']}: {image['shape']}, {image['orientation'] or 'as stored'}, "
                f"{_fmt_spacing(tuple(spacing)) if isinstance(spacing, list) else 'no spacing'}"
                + (f" ({'; '.join(notes)})" if isinstance(notes, list) and notes else "")
            )
    if report.channels:
        lines.append("channels: " + ", ".join(f"{k} ({v})" for k, v in report.channels.items()))
    errors = report.errors
    warnings = [f for f in report.findings if f.severity == "warning"]
    lines.append(f"{len(errors)} error(s), {len(warnings)} warning(s)")
    for finding in errors + warnings:
        lines.append(f"  {finding.severity.upper()} {finding.kind} at {finding.where}: {finding.message}")
    if report.skipped_files:
        n = report.skipped_files
        entries = f"{n} unusable entr{'y' if n == 1 else 'ies'}"
        if report.bad_data == "skip":
            lines.append(
                f"bad-data = skip: training leaves out the {entries} above and trains on the "
                f"{report.entries_ok} others; the site reports skipped-files = {n}."
            )
        else:
            mode = "strict" if report.bad_data == "strict" else "not set in site.toml (the run's, strict by default)"
            lines.append(
                f"bad-data = {mode}: training refuses while the {entries} above remain; fix them, "
                f'or set bad-data = "skip" in site.toml to leave them out (skipped-files = {n}).'
            )
    lines.append("OK: the datalist is usable." if report.ok else "NOT OK: fix the errors above.")
    return "\n".join(lines)


@dataclass
class PolicyCheck:
    """A proposed run checked against the site's privacy policy (:func:`check_run_policy`).

    Attributes
    ----------
    violations
        Every way the run asks for less privacy than the policy allows (empty: accepted).
    problems
        Reasons the run cannot train here at all (e.g. a ``dp-target-epsilon`` no noise reaches).
    notes
        What the site changes without refusing (its budget replaces a larger one, the run's
        ``ledger-dir`` is ignored).
    noise_multiplier
        The DP-SGD noise multiplier the site would train with (``None``: no DP, or no data).
    training_examples
        The training entries the noise was derived for.
    """

    violations: list[Violation] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    noise_multiplier: float | None = None
    training_examples: int = 0

    @property
    def accepted(self) -> bool:
        """No violation and no problem."""
        return not self.violations and not self.problems

    def to_dict(self) -> dict[str, object]:
        """JSON-able form (for ``--json``)."""
        return {
            "accepted": self.accepted,
            "violations": [
                {"key": v.key, "run_value": v.run_value, "limit": v.limit, "policy_key": v.policy_key, "message": str(v)}
                for v in self.violations
            ],
            "problems": list(self.problems),
            "notes": list(self.notes),
            "noise_multiplier": self.noise_multiplier,
            "training_examples": self.training_examples,
        }


def training_entries(report: SiteCheckReport) -> int:
    """The training entries the site would train on (usable, labels within ``num-classes``)."""
    listed = report.splits.get("training", {}).get("entries", 0)
    out_of_range = {
        f.where for f in report.findings if f.kind == "label_out_of_range" and f.where.startswith("training[")
    }
    return max(0, listed - len(out_of_range))


def check_run_policy(policy: SitePolicy, cfg: RunConfig, *, training_examples: int) -> PolicyCheck:
    """Dry-run ``cfg`` against ``policy`` for a site with ``training_examples`` training entries.

    The check is :func:`medfed.client.site_policy.check_run`, the one the site's ClientApp makes
    before training; with ``dp-target-epsilon > 0`` the noise multiplier is derived exactly as
    the site derives it (:func:`~medfed.shared.privacy.planned_noise_multiplier` over the Poisson
    schedule of its training loader).
    """
    result = PolicyCheck(training_examples=training_examples)
    if cfg.dp and training_examples > 0:
        schedule = poisson_schedule_for(num_samples=training_examples, batch_size=cfg.batch_size)
        try:
            result.noise_multiplier = planned_noise_multiplier(
                cfg, sample_rate=schedule.sample_rate, steps_per_round=cfg.local_epochs * schedule.steps_per_epoch
            )
        except ValueError as err:
            result.problems.append(str(err))
    elif cfg.dp:
        result.problems.append("dp = true but the datalist has no usable training entries: DP-SGD cannot train here.")
    result.violations = check_run(policy, cfg, noise_multiplier=result.noise_multiplier)
    if cfg.dp and cfg.dp_budget_epsilon > policy.budget_epsilon:
        result.notes.append(
            f"the run's dp-budget-epsilon = {cfg.dp_budget_epsilon:g} is above this site's "
            f"{policy.budget_epsilon:g}: the site keeps its own (it only ever lowers it)."
        )
    if cfg.ledger_dir:
        result.notes.append("the run's ledger-dir is ignored: this site keeps its ledger in its own ledger-dir.")
    return result


def format_policy(check: PolicyCheck) -> str:
    """Plain-text verdict of :func:`check_run_policy` (one line per violation, with the key and the limit)."""
    lines = []
    if check.noise_multiplier is not None:
        lines.append(
            f"privacy: DP-SGD noise multiplier {check.noise_multiplier:.4g} for {check.training_examples} training entries"
        )
    for note in check.notes:
        lines.append(f"  NOTE {note}")
    for problem in check.problems:
        lines.append(f"  ERROR {problem}")
    for violation in check.violations:
        lines.append(f"  VIOLATION {violation}")
    if check.accepted:
        lines.append("ACCEPTED: the run asks for no less privacy than this site's policy allows.")
    else:
        n = len(check.violations)
        lines.append(
            f"REFUSED: {n} policy violation(s){' and problems' if check.problems else ''}; the site would refuse "
            "this run before training."
        )
    return "\n".join(lines)
