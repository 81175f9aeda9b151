"""A hospital site's configuration (``site.toml``) and its startup kit (``kit.toml``).

``site.toml`` is written by the site's IT team (``medfed provision`` puts a commented template
in every kit); ``kit.toml`` is written by the coordinator and says which federation, SuperLink
and keys the kit holds. Both are validated on load: an unknown key, a wrong type or a missing
file is a :class:`SiteConfigError` naming the file, the key and the fix.
"""

from __future__ import annotations

import re
import stat
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from medfed.client.site_policy import SitePolicy, policy_problems
from medfed.shared.auth_keys import AuthKeyError, private_key_matches, public_key_text
from medfed.shared.config import BAD_DATA_MODES, ConfigError, close_matches, parse_spacing
from medfed.shared.files import read_toml

__all__ = ["SiteConfigError", "SiteConfig", "Kit", "load_site_config", "load_kit", "node_config_arg"]

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class SiteConfigError(ValueError):
    """``site.toml`` or a startup kit is invalid; the message names the file and key."""

    egress_category = "config-error"
    """What the coordinator is told (:mod:`medfed.shared.error_codes`), never the message."""


@dataclass(frozen=True)
class SiteConfig:
    """What a site decides for itself.

    Parameters
    ----------
    site_name
        The site's name (local logs only; the federation knows the site by its key).
    datalist
        Absolute path of the site's MONAI-style datalist JSON (relative paths in ``site.toml``
        are resolved against the file's folder).
    device
        ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``.
    dp_budget_epsilon
        The site's cap on DP-SGD epsilon over all runs on its datalist (one ledger): a run's
        budget only ever lowers it, a run whose ``dp-target-epsilon`` exceeds it is refused.
    require_dp, dp_max_delta, dp_min_noise_multiplier, dp_require_secure_noise
        The rest of the site's privacy policy (:mod:`medfed.client.site_policy`): refuse runs
        without DP-SGD, with ``dp-delta`` above ``dp_max_delta``, with a noise multiplier below
        ``dp_min_noise_multiplier``, or with ``dp-secure-noise = false``.
    ledger_dir
        The site's folder for its privacy ledgers (``""``: ``<state>/ledgers``; relative paths
        resolve against ``site.toml``'s folder). The coordinator's ``ledger-dir`` is ignored.
    cross_site_min_count
        The smallest subgroup this site reports in cross-site evaluation (``0``: the run's
        ``cross-site-min-count``; else >= 2, and the larger of the two applies).
    runtime_port
        Port of the SuperNode's local runtime API (bound to 127.0.0.1).
    state_dir
        Flower's home at the site (installed app bundles, logs); empty: ``<kit>/state``.
    image_size
        Side length used by ``medfed site check`` (``0``: images must share one size).
    num_classes
        If > 0, ``medfed site check`` flags labels (mask values) >= this.
    bad_data
        What this site does with unusable datalist entries: ``"strict"`` (refuse to train,
        naming them in the site's log), ``"skip"`` (train on the usable ones, report their
        count as ``skipped-files``), or ``""`` (follow the run's ``bad-data``). The site's
        choice wins over the run's: the data is the site's.
    spacing
        The voxel size in mm this site resamples its NIfTI/DICOM images to after bringing them
        to RAS (``"1.5"``, ``"1,1,2"``, or a number); ``""`` follows the run's ``spacing``. The
        site's choice wins over the run's: the site knows its scanners (which spacing its
        volumes come in, which resampling is sound for them); the model's input size stays the
        run's ``image-size`` either way. ``medfed site check`` uses it too.
    auth_private_key
        The site's own SuperNode authentication private key (``medfed site keygen``), for a kit
        enrolled with only its public key; relative to ``site.toml``'s folder; empty: the kit's.
    source
        The file this was read from.
    """

    site_name: str
    datalist: Path
    device: str = "auto"
    dp_budget_epsilon: float = 8.0
    require_dp: bool = False
    dp_max_delta: float = 1e-5
    dp_min_noise_multiplier: float = 0.0
    dp_require_secure_noise: bool = True
    ledger_dir: str = ""
    cross_site_min_count: int = 0
    runtime_port: int = 9094
    state_dir: str = ""
    image_size: int = 0
    num_classes: int = 0
    bad_data: str = ""
    spacing: str = ""
    auth_private_key: str = ""
    source: Path | None = None

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The accepted kebab-case keys of ``site.toml``."""
        return tuple(f.name.replace("_", "-") for f in fields(cls) if f.name != "source")

    def state_path(self, kit: Kit) -> Path:
        """The Flower home directory for this site."""
        if self.state_dir:
            path = Path(self.state_dir).expanduser()
            base = self.source.parent if self.source else Path.cwd()
            return path if path.is_absolute() else (base / path).resolve()
        return kit.root / "state"

    def ledger_path_dir(self, kit: Kit) -> Path:
        """The folder of this site's privacy ledgers (``ledger-dir``, default ``<state>/ledgers``)."""
        if self.ledger_dir:
            path = Path(self.ledger_dir).expanduser()
            base = self.source.parent if self.source else Path.cwd()
            return path if path.is_absolute() else (base / path).resolve()
        return self.state_path(kit) / "ledgers"

    def policy(self, kit: Kit | None = None) -> SitePolicy:
        """The site's privacy policy (its ledger folder needs the ``kit``; without one it is ``""``)."""
        return SitePolicy(
            require_dp=self.require_dp,
            budget_epsilon=self.dp_budget_epsilon,
            max_delta=self.dp_max_delta,
            min_noise_multiplier=self.dp_min_noise_multiplier,
            require_secure_noise=self.dp_require_secure_noise,
            ledger_dir=str(self.ledger_path_dir(kit)) if kit is not None else "",
            cross_site_min_count=self.cross_site_min_count,
        )
    def auth_key_path(self) -> Path | None:
        """:attr:`auth_private_key` resolved against ``site.toml``'s folder (``None``: not set)."""
        if not self.auth_private_key:
            return None
        path = Path(self.auth_private_key).expanduser()
        base = self.source.parent if self.source else Path.cwd()
        return path if path.is_absolute() else (base / path).resolve()


def _expect(source: Path, key: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) and kind is not bool:
        raise SiteConfigError(f"{source}: {key} = {value!r} is invalid: expected {what}.")
    if not isinstance(value, kind):
        raise SiteConfigError(f"{source}: {key} = {value!r} is invalid: expected {what}.")
    return value


def load_site_config(path: str | Path, *, require_datalist: bool = True) -> SiteConfig:
    """Read and validate ``site.toml``.

    Parameters
    ----------
    path
        The TOML file.
    require_datalist
        Also check that the datalist file exists.

    Raises
    ------
    SiteConfigError
        Missing file, invalid TOML, unknown key (the message lists the valid ones), wrong
        type or range, or a datalist that does not exist.
    """
    source = Path(path).expanduser().resolve()
    raw = read_toml(
        source,
        error=SiteConfigError,
        what="site config",
        if_missing=f"site config {source} does not exist. Copy site.toml from your startup kit and edit it.",
    )
    valid = SiteConfig.keys()
    for key in raw:
        if key not in valid:
            hint = close_matches(str(key), valid)
            raise SiteConfigError(f"{source}: unknown key {key!r}.{hint} Valid keys: {', '.join(valid)}.")
    for key in ("site-name", "datalist"):
        if key not in raw:
            raise SiteConfigError(f"{source}: {key!r} is missing; see the template in your startup kit.")

    name = _expect(source, "site-name", raw["site-name"], str, "a string")
    if not name.strip():
        raise SiteConfigError(f"{source}: site-name must not be empty.")
    datalist_text = _expect(source, "datalist", raw["datalist"], str, "the path of a datalist .json")
    datalist = Path(datalist_text).expanduser()
    if not datalist.is_absolute():
        datalist = (source.parent / datalist).resolve()
    if require_datalist and not datalist.is_file():
        raise SiteConfigError(
            f"{source}: datalist = {datalist_text!r} does not exist (looked for {datalist}). Give "
            "the path of this site's datalist JSON."
        )
    device = _expect(source, "device", raw.get("device", "auto"), str, '"auto", "cpu" or "cuda[:N]"')
    if not _DEVICE.match(device):
        raise SiteConfigError(f'{source}: device = {device!r} is invalid: use "auto", "cpu" or "cuda[:N]".')
    budget = float(_expect(source, "dp-budget-epsilon", raw.get("dp-budget-epsilon", 8.0), (int, float), "a number > 0"))
    max_delta = float(_expect(source, "dp-max-delta", raw.get("dp-max-delta", 1e-5), (int, float), "a number in (0, 1)"))
    min_noise = float(
        _expect(source, "dp-min-noise-multiplier", raw.get("dp-min-noise-multiplier", 0.0), (int, float), "a number >= 0")
    )
    for key, problem in policy_problems(budget_epsilon=budget, max_delta=max_delta, min_noise_multiplier=min_noise):
        raise SiteConfigError(f"{source}: {key} = {problem}")
    require_dp = _expect(source, "require-dp", raw.get("require-dp", False), bool, "true or false")
    secure = _expect(source, "dp-require-secure-noise", raw.get("dp-require-secure-noise", True), bool, "true or false")
    ledger_dir = _expect(source, "ledger-dir", raw.get("ledger-dir", ""), str, 'a folder path (or "")')
    min_count = _expect(source, "cross-site-min-count", raw.get("cross-site-min-count", 0), int, "0 or an integer >= 2")
    if min_count == 1 or min_count < 0:
        raise SiteConfigError(f"{source}: cross-site-min-count = {min_count} is invalid: use 0 (the run's) or an integer >= 2.")
    port = _expect(source, "runtime-port", raw.get("runtime-port", 9094), int, "an integer port")
    if not 1024 <= port <= 65535:
        raise SiteConfigError(f"{source}: runtime-port = {port} is invalid: use 1024-65535.")
    state_dir = _expect(source, "state-dir", raw.get("state-dir", ""), str, "a folder path (or \"\")")
    image_size = _expect(source, "image-size", raw.get("image-size", 0), int, "an integer >= 0")
    num_classes = _expect(source, "num-classes", raw.get("num-classes", 0), int, "an integer >= 0")
    for key, value in (("image-size", image_size), ("num-classes", num_classes)):
        if value < 0:
            raise SiteConfigError(f"{source}: {key} = {value} is invalid: it must be >= 0.")
    choices = ("", *BAD_DATA_MODES)
    bad_data = _expect(source, "bad-data", raw.get("bad-data", ""), str, " or ".join(f'"{c}"' for c in choices))
    if bad_data not in choices:
        hint = close_matches(bad_data, BAD_DATA_MODES)
        raise SiteConfigError(
            f"{source}: bad-data = {bad_data!r} is invalid.{hint} Valid choices: "
            + ", ".join(f'"{c}"' for c in choices)
            + ' ("" follows the run).'
        )
    spacing_raw = _expect(source, "spacing", raw.get("spacing", ""), (str, int, float), 'a voxel size in mm ("1.5", "1,1,2")')
    spacing = spacing_raw if isinstance(spacing_raw, str) else f"{spacing_raw:g}"
    try:
        parse_spacing(spacing_raw)
    except ConfigError as err:
        raise SiteConfigError(f"{source}: {err}") from None
    auth_key = _expect(source, "auth-private-key", raw.get("auth-private-key", ""), str, 'a key file path (or "")')
    return SiteConfig(
        site_name=name,
        datalist=datalist,
        device=device,
        dp_budget_epsilon=budget,
        require_dp=require_dp,
        dp_max_delta=max_delta,
        dp_min_noise_multiplier=min_noise,
        dp_require_secure_noise=secure,
        ledger_dir=ledger_dir,
        cross_site_min_count=min_count,
        runtime_port=port,
        state_dir=state_dir,
        image_size=image_size,
        num_classes=num_classes,
        bad_data=bad_data,
        spacing=spacing,
        auth_private_key=auth_key,
        source=source,
    )


@dataclass(frozen=True)
class Kit:
    """A site's startup kit (written by ``medfed provision``)."""

    root: Path
    federation: str
    site_name: str
    site_index: int
    superlink: str
    ca_cert: Path
    auth_private_key: Path
    auth_public_key: Path
    signing_public_key: Path
    signing_fingerprint: str


def load_kit(path: str | Path, *, auth_private_key: Path | None = None) -> Kit:
    """Read and check a startup kit folder.

    Parameters
    ----------
    path
        The kit folder.
    auth_private_key
        The site's own authentication private key (``site.toml``'s ``auth-private-key``): needed
        when the kit was enrolled with the site's public key only (its ``kit.toml`` names no
        private key); it wins over the kit's key otherwise. It must belong to the kit's
        ``site-auth.pub``, the key the coordinator registered.

    Raises
    ------
    SiteConfigError
        Missing ``kit.toml`` or kit files, no private key, a private key readable by others, or
        one that does not belong to the kit's public key.
    """
    root = Path(path).expanduser().resolve()
    manifest = root / "kit.toml"
    raw = read_toml(
        manifest,
        error=SiteConfigError,
        what="kit manifest",
        if_missing=f"{root} is not a startup kit ({manifest.name} is missing). Pass the folder the "
        "coordinator sent (it holds kit.toml, ca.crt, site-auth.pub, app-signing.pub).",
        if_invalid="Ask the coordinator for a fresh kit.",
    )
    try:
        kit_key = str(raw["auth-private-key"])
        if auth_private_key is None and not kit_key:
            raise SiteConfigError(
                f"startup kit {root} holds no private key: the coordinator enrolled this site's own key. "
                "Set auth-private-key in site.toml to the site-auth.key that `medfed site keygen` wrote."
            )
        kit = Kit(
            root=root,
            federation=str(raw["federation"]),
            site_name=str(raw["site-name"]),
            site_index=int(raw["site-index"]),
            superlink=str(raw["superlink"]),
            ca_cert=root / str(raw["ca-certificate"]),
            auth_private_key=Path(auth_private_key) if auth_private_key is not None else root / kit_key,
            auth_public_key=root / str(raw["auth-public-key"]),
            signing_public_key=root / str(raw["app-signing-public-key"]),
            signing_fingerprint=str(raw.get("app-signing-fingerprint", "")),
        )
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, SiteConfigError):
            raise
        raise SiteConfigError(f"{manifest} lacks or garbles {err}; ask the coordinator for a fresh kit.") from None
    for label, file in (
        ("CA certificate", kit.ca_cert),
        ("authentication public key", kit.auth_public_key),
        ("app-signing public key", kit.signing_public_key),
    ):
        if not file.is_file():
            raise SiteConfigError(f"startup kit {root}: the {label} {file.name} is missing; ask for a fresh kit.")
    if not kit.auth_private_key.is_file():
        where = "auth-private-key in site.toml" if auth_private_key is not None else f"startup kit {root}"
        raise SiteConfigError(
            f"{where}: the authentication key {kit.auth_private_key} is missing. Give the file "
            "`medfed site keygen` wrote, or ask the coordinator for a fresh kit."
        )
    mode = stat.S_IMODE(kit.auth_private_key.stat().st_mode)
    if mode & 0o077:
        raise SiteConfigError(
            f"{kit.auth_private_key} (the site's authentication key) is readable by other users (mode "
            f"{mode:o}). Run: chmod 600 {kit.auth_private_key}"
        )
    try:
        public = public_key_text(kit.auth_public_key.read_text(), source=str(kit.auth_public_key))
        matches = private_key_matches(kit.auth_private_key, public)
    except AuthKeyError as err:
        raise SiteConfigError(f"startup kit {root}: {err}") from None
    if not matches:
        raise SiteConfigError(
            f"the authentication key {kit.auth_private_key} does not belong to {kit.auth_public_key} (the "
            "key the coordinator enrolled): the SuperLink would refuse this site. Use the private key of "
            "the public key you sent the coordinator, or send it the new public key."
        )
    return kit


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def node_config_arg(kit: Kit, site: SiteConfig) -> str:
    """The SuperNode's ``--node-config`` value: what the site's ClientApp reads.

    Keys: ``site-name``, ``site-index``, ``datalist``, ``device``, the privacy policy
    (:data:`medfed.client.site_policy.POLICY_NODE_KEYS`: ``require-dp``, ``dp-budget-epsilon``,
    ``dp-max-delta``, ``dp-min-noise-multiplier``, ``dp-require-secure-noise`` and the absolute
    ``ledger-dir``), and ``bad-data`` and ``spacing`` when the site sets them. The node config stays on the site
    (the ClientApp reads it from its local Context); the coordinator never sees it.
    """
    for label, value in (("site-name", site.site_name), ("datalist", str(site.datalist))):
        if "'" in value or '"' in value:
            raise SiteConfigError(f"{label} must not contain quotes (Flower's node config cannot hold them).")
    items = {
        "site-name": _toml_string(site.site_name),
        "site-index": str(kit.site_index),
        "datalist": _toml_string(str(site.datalist)),
        "device": _toml_string(site.device),
    }
    try:
        items.update(site.policy(kit).to_node_config())
    except ValueError as err:
        raise SiteConfigError(f"{site.source}: {err}") from None
    if site.bad_data:
        items["bad-data"] = _toml_string(site.bad_data)
    if site.spacing:
        items["spacing"] = _toml_string(site.spacing)
    return " ".join(f"{k}={v}" for k, v in items.items())
