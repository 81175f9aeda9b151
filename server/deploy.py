"""The coordinator on Flower's deployment engine: SuperLink, site enrolment and signed runs.

* :func:`superlink_command` / :func:`run_superlink`: ``flower-superlink`` with TLS (the
  federation's certificate), SuperNode authentication, a SQLite state database (a restart
  keeps runs and registered sites) and runtime dependency installation disabled. Once it
  answers, the registrations are reconciled with the enrolment (``federation.toml``) through
  Flower's Control API: every registered key no enrolled site has (a dropped site's, a re-keyed
  site's old key) is unregistered (``flwr supernode unregister``), then every enrolled site's
  key is registered under the site's name (``flwr supernode register``); keys registered
  before are kept. The SuperLink's environment names the federation folder
  (:data:`medfed.server.identity.ENROLMENT_ENV`), so the ServerApp processes it launches key
  their records by each node's enrolled site (:mod:`medfed.server.identity`).
* :func:`stage_app`, :func:`submit_run`: ``medfed run``. The medfed packages are copied into
  a fresh Flower app folder whose ``pyproject.toml`` holds the complete run config; the FAB is
  built from it with Flower's own builder, signed with the coordinator's key (see
  :mod:`medfed.server.signing`), and submitted with ``flwr run`` with the signature as the only
  run-config override.

Flower 1.42 serves its Fleet API (the sites), Control API (run submission, SuperNode
registration) and Runtime API (the ServerApp process) on one HTTPS port, and open-source Flower
has no account authentication on the Control API (OIDC is a Flower Enterprise feature). medfed
therefore runs the SuperLink through :func:`superlink_main`: Flower's own SuperLink app with one
extra ASGI middleware (:class:`LocalAPIGuard`) that answers ``403`` to Control and Runtime API
requests from anywhere but the coordinator's host (loopback, the SuperLink's own bind address,
and networks given with ``--control-allow``). The sites need only the Fleet API, which Flower
authenticates with their registered keys.
"""

from __future__ import annotations

import importlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import tomli_w

from medfed.server.identity import ENROLMENT_ENV, flower_public_key
from medfed.server.provision import Federation, ca_key_warning, parse_address
from medfed.server.signing import SIGNATURE_KEY, fab_hash, load_private_key, sign_app
from medfed.shared.config import RunConfig
from medfed.shared.executables import installed_executable

__all__ = [
    "DeployError",
    "LocalAPIGuard",
    "allowed_networks",
    "superlink_main",
    "APP_PACKAGES",
    "superlink_command",
    "wait_until_serving",
    "register_sites",
    "run_superlink",
    "stage_app",
    "build_signed_app",
    "SignedApp",
    "submit_run",
    "run_status",
    "wait_for_run",
    "flwr_env",
]

logger = logging.getLogger(__name__)

APP_PACKAGES: tuple[str, ...] = ("client", "server", "shared")
"""The medfed subpackages an app bundle carries, as ``medfed/<name>/`` (the ServerApp and ClientApp
import only these; the sites run this signed copy, not their installed one: ``docs/deploy.md``)."""


class DeployError(RuntimeError):
    """The SuperLink or a run could not be started; the message says why and what to do."""


# --------------------------------------------------------------------------- SuperLink
LOCAL_API_PREFIXES: tuple[str, ...] = ("/v1/control/", "/v1/runtime/")
"""Paths served only to the coordinator's host (Control API, Runtime API)."""


class LocalAPIGuard:
    """ASGI middleware: Control and Runtime API requests only from allowed addresses.

    Parameters
    ----------
    app
        The SuperLink's FastAPI app.
    allowed
        Networks whose clients may call the Control and Runtime APIs.
    """

    def __init__(self, app: Any, allowed: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        self.app = app
        self.allowed = tuple(allowed)

    def permits(self, host: str | None) -> bool:
        """Whether a client at ``host`` may call the Control and Runtime APIs."""
        if not host:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        mapped = getattr(address, "ipv4_mapped", None)
        address = mapped or address
        return any(address in net for net in self.allowed if net.version == address.version)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") == "http" and str(scope.get("path", "")).startswith(LOCAL_API_PREFIXES):
            client = scope.get("client") or (None, None)
            if not self.permits(client[0]):
                logger.warning(
                    "refused %s from %s: the Control and Runtime APIs answer only the coordinator's "
                    "host (medfed server start --control-allow CIDR to allow more)",
                    scope.get("path"), client[0],
                )
                body = json.dumps({"detail": "forbidden: coordinator-only API"}).encode()
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def allowed_networks(host: str, extra: Sequence[str] = ()) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Loopback, the SuperLink's own bind address (unless it binds all), and ``extra`` CIDRs.

    Raises
    ------
    DeployError
        An entry of ``extra`` is not a network (the message names it).
    """
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = [
        ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")
    ]
    try:
        bound = ipaddress.ip_address(host)
        if not bound.is_unspecified:
            networks.append(ipaddress.ip_network(bound))
    except ValueError:
        pass
    for item in extra:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise DeployError(f"--control-allow {item!r} is not an IP network (e.g. 10.0.0.0/24).") from None
    return networks


CONTROL_ALLOW_ENV = "MEDFED_CONTROL_ALLOW"


def superlink_main(argv: Sequence[str] | None = None) -> None:
    """``flower-superlink`` with :class:`LocalAPIGuard` in front of Flower's app.

    Takes ``flower-superlink``'s arguments; the allowed extra networks come from
    :data:`CONTROL_ALLOW_ENV` (comma-separated CIDRs). Otherwise identical to Flower's
    ``flower_superlink()``: same configuration parsing, same app, same uvicorn settings.
    """
    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.main import create_app

    flower = importlib.import_module("flwr.superlink.cli.flower_superlink")

    sys.argv = ["flower-superlink", *(argv if argv is not None else sys.argv[1:])]
    config = flower._parse_superlink_lifespan_config()
    extra = [c for c in os.environ.get(CONTROL_ALLOW_ENV, "").split(",") if c.strip()]
    app = create_app(config, flower.SuperLinkLifespan)
    guarded = LocalAPIGuard(app, allowed_networks(config.host, extra))
    uvicorn.run(
        app=guarded,
        host=config.host,
        port=config.port,
        reload=False,
        access_log=True,
        log_config=get_uvicorn_log_config(console_handler.level),
        ssl_keyfile=config.ssl_keyfile,
        ssl_certfile=config.ssl_certfile,
        workers=1,
        lifespan="on",
    )


def superlink_command(
    fed: Federation, *, database: Path, host: str = "0.0.0.0", port: int | None = None
) -> list[str]:
    """The SuperLink command line for ``fed`` (Flower's SuperLink behind :class:`LocalAPIGuard`)."""
    _, address_port = parse_address(fed.superlink_address)
    return [
        sys.executable, "-m", "medfed.server.deploy", "superlink",
        "--ssl-ca-certfile", str(fed.ca_cert),
        "--ssl-certfile", str(fed.server_cert),
        "--ssl-keyfile", str(fed.server_key),
        "--enable-supernode-auth",
        "--database", str(database),
        "--disable-runtime-dependency-installation",
        "--host", host,
        "--port", str(port or address_port),
    ]


_flower_exe = partial(installed_executable, error=DeployError)
"""Flower's program ``name`` (beside this interpreter, else on ``PATH``); :class:`DeployError` if missing."""


OFFLINE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
"""Flower's anonymous telemetry and update check off: no connection but the federation's."""


def flwr_env(fed: Federation) -> dict[str, str]:
    """Environment for the coordinator's Flower processes: ``FLWR_HOME`` (the TLS connection),
    telemetry and update checks off (:data:`OFFLINE_ENV`), and this Python's scripts folder first
    on ``PATH`` (the SuperLink starts ``flower-superexec`` by name: without it a medfed run as
    ``/opt/medfed/.venv/bin/medfed`` from a service unit, venv not activated, fails to start)."""
    env = {**os.environ, **OFFLINE_ENV}
    env["FLWR_HOME"] = str(fed.flwr_home)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def wait_until_serving(
    fed: Federation,
    *,
    address: str | None = None,
    timeout: float = 60.0,
    proc: subprocess.Popen[Any] | None = None,
) -> None:
    """Block until the SuperLink completes a TLS handshake checked against the federation CA.

    Raises
    ------
    DeployError
        If it does not within ``timeout`` seconds, or ``proc`` (the SuperLink) exits first.
    """
    host, port = parse_address(address or fed.superlink_address)
    context = ssl.create_default_context(cafile=str(fed.ca_cert))
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise DeployError(f"the SuperLink exited with code {proc.returncode} before serving; see its log.")
        try:
            with socket.create_connection((host, port), timeout=2) as sock:
                with context.wrap_socket(sock, server_hostname=host):
                    return
        except (OSError, ssl.SSLError) as err:
            last = err
            time.sleep(0.3)
    raise DeployError(
        f"the SuperLink at {host}:{port} did not answer over TLS within {timeout:.0f} s ({last}). "
        "Check its log."
    )


def _control_client(fed: Federation, address: str | None = None) -> Any:
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection

    connection = SuperLinkConnection(
        name=fed.connection_name,
        address=address or fed.superlink_address,
        root_certificates=str(fed.ca_cert),
    )
    return init_http_client_from_connection(connection)


def register_sites(fed: Federation, *, address: str | None = None) -> dict[str, str]:
    """Reconcile the SuperLink's registered keys with the enrolment (Flower Control API).

    First every registered node whose public key no enrolled site has is unregistered (a
    dropped site, or the old key of a re-keyed one: it can no longer connect), then every
    enrolled site's key is registered under the site's name.

    Returns
    -------
    dict
        Site name -> ``"registered"`` or ``"already registered"``; and ``"node <id>"`` ->
        ``"unregistered (<name>: key not enrolled)"`` for each key removed.

    Raises
    ------
    DeployError
        Naming the site or node whose key could not be registered or unregistered.
    """
    from flwr.proto.control_pb2 import ListNodesRequest, RegisterNodeRequest, UnregisterNodeRequest
    from flwr.supercore.constant import NodeStatus
    from flwr.supercore.error.base import ApiErrorCode

    client = _control_client(fed, address)
    outcome: dict[str, str] = {}
    try:
        missing = [site.name for site in fed.sites if not site.key]
        if missing:
            raise DeployError(
                f"{fed.root / 'federation.toml'} records no public key for site(s) {', '.join(missing)}: "
                "re-run `medfed provision` (with --site-public-key NAME=FILE for a site's own key)."
            )
        enrolled = {flower_public_key(site.key): site.name for site in fed.sites}
        try:
            nodes = client.ListNodes(request=ListNodesRequest()).nodes_info
        except Exception as err:  # the HTTP client raises httpx errors carrying Flower's payload
            raise DeployError(f"listing the SuperLink's registered sites failed: {err}") from None
        for node in nodes:
            if node.status == NodeStatus.UNREGISTERED or bytes(node.public_key) in enrolled:
                continue
            label = node.name or "unnamed"
            try:
                client.UnregisterNode(request=UnregisterNodeRequest(node_id=node.node_id))
            except Exception as err:
                raise DeployError(
                    f"unregistering node {node.node_id} ({label}), whose key is no longer enrolled, failed: {err}"
                ) from None
            outcome[f"node {node.node_id}"] = f"unregistered ({label}: key not enrolled)"
            logger.warning(
                "unregistered node %d (%s): its key is not enrolled in %s (dropped or re-keyed site); it "
                "can no longer connect", node.node_id, label, fed.root.name,
            )
        for site in fed.sites:
            try:
                client.RegisterNode(request=RegisterNodeRequest(public_key=flower_public_key(site.key), name=site.name))
                outcome[site.name] = "registered"
            except Exception as err:
                if _flower_error_code(err) == ApiErrorCode.PUBLIC_KEY_ALREADY_IN_USE or "already in use" in str(err):
                    outcome[site.name] = "already registered"
                else:
                    raise DeployError(f"registering site {site.name!r} failed: {err}") from None
    finally:
        client.close()
    logger.info("site keys at the SuperLink: %s", ", ".join(f"{k}: {v}" for k, v in outcome.items()))
    return outcome


def _flower_error_code(err: Exception) -> int | None:
    """The Flower API error code in an HTTP error's response body, if any."""
    from flwr.supercore.error.base import FlowerError

    response = getattr(err, "response", None)
    flower_error = FlowerError.from_json(getattr(response, "text", None)) if response is not None else None
    return int(flower_error.code) if flower_error is not None else None


def run_superlink(
    fed: Federation,
    *,
    database: Path | None = None,
    host: str = "0.0.0.0",
    port: int | None = None,
    stop_event: threading.Event | None = None,
    ready_event: threading.Event | None = None,
    log_file: Path | None = None,
    control_allow: Sequence[str] = (),
) -> int:
    """Run the SuperLink until it exits, ``stop_event`` is set, or SIGTERM/SIGINT.

    Parameters
    ----------
    fed
        The provisioned federation.
    database
        SQLite state file (default ``<federation>/superlink/state.db``); reuse it across
        restarts to keep runs and registrations.
    host, port
        Where to listen (default: every interface, the port of the federation's address).
    stop_event, ready_event
        Set ``stop_event`` to stop; ``ready_event`` is set once sites are registered.
    log_file
        Where the SuperLink's output goes (default: inherited stdout/stderr).
    control_allow
        Extra networks (CIDR) allowed to use the Control and Runtime APIs besides the
        coordinator's host (see :class:`LocalAPIGuard`).

    Returns
    -------
    int
        0 after a requested stop, else the SuperLink's exit code.
    """
    database = database or fed.root / "superlink" / "state.db"
    database.parent.mkdir(parents=True, exist_ok=True)
    _, address_port = parse_address(fed.superlink_address)
    local = f"127.0.0.1:{port or address_port}"
    command = superlink_command(fed, database=database, host=host, port=port)
    stop = stop_event or threading.Event()
    previous = _install_stop_handlers(stop)
    allowed_networks(host, control_allow)  # validate before starting anything
    env = flwr_env(fed)
    env[CONTROL_ALLOW_ENV] = ",".join(control_allow)
    env[ENROLMENT_ENV] = str(fed.root)  # the ServerApp's site identities (medfed.server.identity)
    warning = ca_key_warning(fed.ca_key, fed.root)
    if warning:
        logger.warning("%s", warning)
    sink = open(log_file, "a", encoding="utf-8") if log_file else None  # noqa: SIM115
    proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT if sink else None, env=env)
    try:
        logger.info(
            "SuperLink of federation %s on %s:%d (TLS, SuperNode authentication, state in %s)",
            fed.name, host, port or address_port, database.name,
        )
        wait_until_serving(fed, address=local, proc=proc)
        register_sites(fed, address=local)
        if ready_event:
            ready_event.set()
        while not stop.is_set() and proc.poll() is None:
            stop.wait(0.2)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
            return 0
        return int(proc.returncode)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if sink:
            sink.close()
        _restore_handlers(previous)


def _install_stop_handlers(stop: threading.Event) -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


# --------------------------------------------------------------------------- app bundle
def _package_dir(name: str) -> Path:
    """The folder of the imported package ``name`` (``medfed`` or ``medfed.<sub>``)."""
    module = importlib.import_module(name)
    return Path(module.__file__).resolve().parent  # type: ignore[arg-type]


def _medfed_version() -> str:
    try:
        return metadata.version("medfed")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def stage_app(cfg: RunConfig, dest: Path) -> Path:
    """Write a Flower app folder for ``cfg``: medfed's packages plus a generated ``pyproject.toml``.

    The ``[tool.flwr.app.config]`` table holds every :class:`RunConfig` key with ``cfg``'s value
    (and an empty :data:`~medfed.server.signing.SIGNATURE_KEY`), so the bundle itself records the run's
    settings.
    """
    package = dest / "medfed"
    package.mkdir(parents=True, exist_ok=True)
    shutil.copy2(_package_dir("medfed") / "__init__.py", package / "__init__.py")
    for name in APP_PACKAGES:
        shutil.copytree(
            _package_dir(f"medfed.{name}"), package / name,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "tests"), dirs_exist_ok=True,
        )
    config = cfg.replace(app_signature="").to_run_config()
    pyproject = {
        "build-system": {"requires": ["setuptools>=69"], "build-backend": "setuptools.build_meta"},
        "project": {
            "name": "medfed",
            "version": _medfed_version(),
            "description": "medfed federated training app (generated by `medfed run`).",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "medfed",
                    "components": {
                        "serverapp": "medfed.server.server_app:app",
                        "clientapp": "medfed.client.client_app:app",
                    },
                    "config": config,
                }
            }
        },
    }
    (dest / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return dest


@dataclass
class SignedApp:
    """A staged app, its FAB hash, and the signed run-config override."""

    app_dir: Path
    fab_sha256: str
    signature: str
    overrides_file: Path
    run_config: dict[str, Any] = field(default_factory=dict)


def build_signed_app(cfg: RunConfig, *, signing_key: Path, workdir: Path) -> SignedApp:
    """Stage the app, build its FAB with Flower's builder, and sign (FAB hash, run config).

    The run config signed is exactly what Flower will hand the ClientApps: the FAB's config
    table fused with the overrides (here, only the signature, which the payload excludes).
    """
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import flatten_dict, get_fab_config

    key = load_private_key(signing_key)
    app_dir = stage_app(cfg, workdir / "medfed-app")
    fab = build_fab_from_disk(app_dir)
    run_config = flatten_dict(get_fab_config(fab)["tool"]["flwr"]["app"].get("config", {}))
    signature = sign_app(fab, run_config, key)
    overrides = workdir / "signature.toml"
    overrides.write_text(tomli_w.dumps({SIGNATURE_KEY: signature}))
    return SignedApp(app_dir, fab_hash(fab), signature, overrides, run_config)


def submit_run(
    fed: Federation, cfg: RunConfig, *, workdir: Path | None = None, signing_key: Path | None = None
) -> tuple[int, SignedApp]:
    """Sign and submit ``cfg`` as a run of the medfed app (``flwr run`` underneath).

    Returns
    -------
    tuple
        The run ID and the signed app.

    Raises
    ------
    DeployError
        ``flwr run`` failed (its message is included), or Flower built a different bundle
        than the one signed.
    """
    workdir = workdir or Path(tempfile.mkdtemp(prefix="medfed-run-"))
    signed = build_signed_app(cfg, signing_key=signing_key or fed.signing_key, workdir=workdir)
    command = [
        _flower_exe("flwr"), "run", str(signed.app_dir), fed.connection_name,
        "--run-config", str(signed.overrides_file), "--format", "json",
    ]
    proc = subprocess.run(command, capture_output=True, text=True, env=flwr_env(fed), timeout=300)
    payload = _last_json(proc.stdout)
    if proc.returncode != 0 or not payload or not payload.get("success"):
        detail = (payload or {}).get("error-message") or proc.stderr.strip() or proc.stdout.strip()
        raise DeployError(f"`flwr run` did not start the run: {detail}")
    built = str(payload.get("fab-hash", ""))
    if built and not signed.fab_sha256.startswith(built):
        raise DeployError(
            f"Flower built bundle {built}... but medfed signed {signed.fab_sha256[:8]}...: the app "
            "folder changed between the two builds. Run again."
        )
    run_id = int(payload["run-id"])
    logger.info("submitted run %d (app bundle %s..., signed)", run_id, signed.fab_sha256[:12])
    return run_id, signed


def _last_json(text: str) -> dict[str, Any] | None:
    start = text.find("{")
    while start != -1:
        try:
            value = json.loads(text[start:])
            return value if isinstance(value, dict) else None
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return None


def run_status(fed: Federation, run_id: int) -> str:
    """The run's Flower status, e.g. ``"running"`` or ``"finished:completed"`` (``flwr ls``)."""
    proc = subprocess.run(
        [_flower_exe("flwr"), "ls", fed.connection_name, "--run-id", str(run_id), "--format", "json"],
        capture_output=True, text=True, env=flwr_env(fed), timeout=120,
    )
    payload = _last_json(proc.stdout) or {}
    runs = payload.get("runs") or []
    if not payload.get("success") or not runs:
        detail = payload.get("error-message") or proc.stderr.strip()
        raise DeployError(f"`flwr ls --run-id {run_id}` failed: {detail}")
    return str(runs[0].get("status", ""))


def wait_for_run(fed: Federation, run_id: int, *, timeout: float = 600.0, poll: float = 2.0) -> str:
    """Poll until the run is finished; return its final status.

    Raises
    ------
    DeployError
        The run did not finish within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = run_status(fed, run_id)
        if status.startswith("finished"):
            return status
        time.sleep(poll)
    raise DeployError(f"run {run_id} is still {status!r} after {timeout:.0f} s.")


def describe_run_command(fed: Federation, run_id: int) -> Sequence[str]:
    """The ``flwr log`` command that streams a run's logs (printed by the CLI)."""
    return ["flwr", "log", str(run_id), fed.connection_name, "--stream"]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "superlink":
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s medfed %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        superlink_main(sys.argv[2:])
    else:
        raise SystemExit("usage: python -m medfed.server.deploy superlink [flower-superlink options]")
