"""A hospital site on Flower's deployment engine: SuperNode, SuperExec and a verifying ClientApp runner.

``medfed site start`` (:func:`run_site`) starts three kinds of Flower processes, all local:

* ``flower-supernode`` with the kit's CA (``--root-certificates``), the site's authentication
  key, the site's node config and ``--isolation process``: it keeps the one outbound TLS
  connection to the SuperLink and serves its runtime API on ``127.0.0.1:<runtime-port>``.
  Runtime dependency installation stays off (Flower's default for SuperNodes): hospitals are
  offline.
* a SuperExec (:func:`superexec_main`, Flower's ``flower-superexec``) that launches one
  ClientApp process per task; medfed points it at ``medfed-clientapp`` instead of Flower's
  ``flwr-clientapp``.
* ``medfed-clientapp`` (:func:`verified_clientapp_main`): Flower's own ``flwr-clientapp`` with
  one check inserted between pulling the task and installing the app bundle (FAB): the
  coordinator's ed25519 signature over the FAB's SHA-256 and the run config must verify with
  the public key of the site's startup kit (see :mod:`medfed.shared.app_signature`). A bundle that is
  unsigned, altered, or signed by another key is never installed or imported; the site logs
  ``REFUSED app bundle ...`` and answers the server with an error.

What the check protects against: a run submitted to the SuperLink by anyone but the holder of
the coordinator's signing key (Flower 1.42's open-source Control API has no account
authentication); a bundle or run config changed after signing (e.g. DP switched off); a
compromised SuperLink host substituting code. What it does not protect against: a stolen
signing key; the coordinator's own signed code doing harm (the site trusts the coordinator's
review); replay of an earlier signed (bundle, config) pair; the site's own Python environment
(torch, MONAI, Flower are the site's installed packages, not part of the bundle).

The wrapper watches the SuperNode's log and turns Flower's retries and exit codes into one
clear message (wrong CA, key not enrolled, SuperLink unreachable or not speaking TLS).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import Any, TextIO

from medfed.client.site_config import Kit, SiteConfig, node_config_arg
from medfed.shared.executables import installed_executable

__all__ = [
    "SIGNING_KEY_ENV",
    "CLIENTAPP_COMMAND",
    "SiteStartError",
    "SiteProcesses",
    "supernode_command",
    "run_site",
    "diagnose_supernode_line",
    "watch_supernode",
    "superexec_main",
    "verified_clientapp_main",
    "install_fab_verifier",
    "check_code_origin",
    "AppRejected",
]

logger = logging.getLogger(__name__)

SIGNING_KEY_ENV = "MEDFED_APP_SIGNING_KEY"
"""Environment variable naming the coordinator's app-signing public key (set by ``run_site``)."""

CLIENTAPP_COMMAND = "medfed-clientapp"
"""Console script of :func:`verified_clientapp_main`."""

REFUSED_TAG = "REFUSED app bundle"


class SiteStartError(RuntimeError):
    """The site could not join the federation; the message says why and what to do."""


# --------------------------------------------------------------------------- SuperNode
def supernode_command(
    kit: Kit, site: SiteConfig, *, superlink: str | None = None, extra_args: Sequence[str] = ()
) -> list[str]:
    """The ``flower-supernode`` command line for ``site`` with ``kit``."""
    return [
        _flower_exe("flower-supernode"),
        "--superlink", superlink or kit.superlink,
        "--root-certificates", str(kit.ca_cert),
        "--auth-supernode-private-key", str(kit.auth_private_key),
        "--node-config", node_config_arg(kit, site),
        "--isolation", "process",
        "--host", "127.0.0.1",
        "--port", str(site.runtime_port),
        *extra_args,
    ]


def superexec_command(runtime_port: int, *, parent_pid: int) -> list[str]:
    """The SuperExec that launches ``medfed-clientapp`` for the SuperNode on ``runtime_port``."""
    return [
        sys.executable, "-m", "medfed.client.deploy", "superexec",
        "--runtime-api-address", f"127.0.0.1:{runtime_port}",
        "--insecure",  # the runtime API is the SuperNode's own loopback port
        "--parent-pid", str(parent_pid),
    ]


_flower_exe = partial(installed_executable, error=SiteStartError)
"""Flower's program ``name`` (beside this interpreter, else on ``PATH``); :class:`SiteStartError` if missing."""


_DIAGNOSES: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"CERTIFICATE_VERIFY_FAILED|certificate verify failed", re.I),
        "the SuperLink's TLS certificate is not signed by this kit's CA (ca.crt): the kit belongs "
        "to another federation, or the address points at another server. Check the address and "
        "ask the coordinator for the right kit.",
    ),
    (
        re.compile(r"hostname mismatch|doesn't match|IP address mismatch", re.I),
        "the SuperLink's TLS certificate does not name the address this site dials. Use the "
        "address in kit.toml, or ask the coordinator to reissue the certificate for it.",
    ),
    (
        re.compile(r"Failed to activate SuperNode|No SuperNode found with the given public key", re.I),
        "the SuperLink does not know this site's key (site-auth.pub): the site is not enrolled, "
        "or the kit is not the one the coordinator registered. Ask the coordinator to run "
        "`medfed server start` with this site enrolled, or to send the right kit.",
    ),
)


def diagnose_supernode_line(line: str) -> str | None:
    """A clear explanation when a SuperNode log line shows a known failure, else ``None``."""
    for pattern, message in _DIAGNOSES:
        if pattern.search(line):
            return message
    return None


_RETRY = re.compile(r"Connection attempt failed")
_CONNECTED = re.compile(r"SuperNode ID: \d+")


@dataclass
class SiteProcesses:
    """The Flower processes of one running site."""

    supernode: subprocess.Popen[str]
    superexec: subprocess.Popen[bytes] | None = None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM both (SuperExec first, it launches ClientApps), then SIGKILL leftovers."""
        for proc in (self.superexec, self.supernode):
            if proc is not None and proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in (self.superexec, self.supernode):
            if proc is None:
                continue
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_site(
    kit: Kit,
    site: SiteConfig,
    *,
    superlink: str | None = None,
    max_connect_attempts: int = 5,
    out: TextIO | None = None,
    extra_supernode_args: Sequence[str] = (),
    stop_event: threading.Event | None = None,
    on_connected: Callable[[], None] | None = None,
) -> int:
    """Run the site until the SuperNode ends, ``stop_event`` is set, or SIGTERM/SIGINT.

    Parameters
    ----------
    kit, site
        The startup kit and the site's configuration.
    superlink
        Override the kit's SuperLink address (tests, or a DNS change).
    max_connect_attempts
        Failed connection attempts before the first successful one after which the site
        gives up with a clear message (plaintext or unreachable SuperLink). After it has
        connected once, the SuperNode keeps retrying (SuperLink restarts).
    out
        Where the Flower processes' log lines are echoed (default: stdout).
    extra_supernode_args
        Appended to the ``flower-supernode`` command (tests).
    stop_event
        Set it to stop the site (when run in a thread).
    on_connected
        Called once when the SuperLink has accepted the site.

    Returns
    -------
    int
        0 after a requested stop, else the SuperNode's exit code.

    Raises
    ------
    SiteStartError
        The site could not join: the message names the cause and the fix.
    """
    out = out or sys.stdout
    state = site.state_path(kit)
    state.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    env["FLWR_HOME"] = str(state)
    env[SIGNING_KEY_ENV] = str(kit.signing_public_key)
    env["PYTHONUNBUFFERED"] = "1"
    # The SuperNode starts Flower's ClientApp process by name: find it beside this Python even
    # when the virtual environment is not activated (a service unit running .venv/bin/medfed).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    command = supernode_command(kit, site, superlink=superlink, extra_args=extra_supernode_args)
    logger.info(
        "site %s (index %d) joining federation %s at %s; runtime API on 127.0.0.1:%d",
        kit.site_name, kit.site_index, kit.federation, superlink or kit.superlink, site.runtime_port,
    )
    supernode = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1
    )
    procs = SiteProcesses(supernode=supernode)
    stop = stop_event or threading.Event()
    previous = _install_stop_handlers(stop)
    failure: list[str] = []
    try:
        procs.superexec = subprocess.Popen(
            superexec_command(site.runtime_port, parent_pid=supernode.pid),
            stdout=out if _has_fileno(out) else None,
            stderr=subprocess.STDOUT if _has_fileno(out) else None,
            env=env,
        )
        def watch() -> None:
            message = watch_supernode(
                supernode, out=out, max_connect_attempts=max_connect_attempts, on_connected=on_connected
            )
            if message:
                failure.append(message)
                stop.set()

        reader = threading.Thread(target=watch, daemon=True)
        reader.start()
        while not stop.is_set() and supernode.poll() is None:
            stop.wait(0.2)
        requested = stop.is_set() and not failure
        procs.stop()
        reader.join(timeout=5)
        if failure:
            raise SiteStartError(failure[0])
        if requested:
            logger.info("site %s stopped", kit.site_name)
            return 0
        return int(supernode.returncode or 0)
    finally:
        procs.stop()
        _restore_handlers(previous)


def watch_supernode(
    proc: subprocess.Popen[str],
    *,
    out: TextIO,
    max_connect_attempts: int = 5,
    on_connected: Callable[[], None] | None = None,
) -> str | None:
    """Echo a SuperNode's output to ``out`` and explain the first known failure.

    Blocks until the SuperNode's output ends or a failure is recognised (the caller stops the
    process). Before the first successful connection, a TLS or enrolment error, or
    ``max_connect_attempts`` failed attempts (unreachable, or not speaking TLS), is a failure;
    afterwards the SuperNode's own retries are left alone (a SuperLink restart).

    Returns
    -------
    str or None
        The explanation (``"cannot join the federation: ..."``), or ``None`` if none.
    """
    assert proc.stdout is not None
    attempts, connected = 0, False
    for line in proc.stdout:
        out.write(line)
        out.flush()
        if _CONNECTED.search(line):
            connected, attempts = True, 0
            logger.info("connected to the SuperLink")
            if on_connected:
                on_connected()
            continue
        if connected:
            continue
        diagnosis = diagnose_supernode_line(line)
        if diagnosis is None and _RETRY.search(line):
            attempts += 1
            if attempts >= max_connect_attempts:
                diagnosis = (
                    f"{attempts} connection attempts to the SuperLink failed. The SuperLink is down "
                    "or unreachable from here, or does not speak TLS at that address (medfed sites "
                    "connect only over TLS; plaintext is refused). Check the address in kit.toml "
                    "and that outbound HTTPS to it is allowed."
                )
        if diagnosis:
            message = f"cannot join the federation: {diagnosis}"
            logger.error("%s", message)
            return message
    return None


def _has_fileno(stream: TextIO) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True


def _install_stop_handlers(stop: threading.Event) -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict[int, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, lambda *_: stop.set())
    return previous


def _restore_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


# --------------------------------------------------------------------------- SuperExec
def superexec_main(argv: Sequence[str] | None = None) -> None:
    """Flower's ``flower-superexec``, launching ``medfed-clientapp`` for ClientApp tasks.

    Flower's subprocess executor looks the command of each task type up in
    ``flwr.supercore.constant.TASK_TYPE_TO_COMMAND``; medfed changes the ClientApp entry of that
    table in this process only. Other task types are not used by a SuperNode.
    """
    from flwr.supercore import constant
    from flwr.supercore.cli.flower_superexec import flower_superexec

    command = installed_executable(
        CLIENTAPP_COMMAND, error=SystemExit, fix="reinstall medfed (pip install medfed) so its console scripts exist"
    )
    constant.TASK_TYPE_TO_COMMAND[constant.TaskType.CLIENT_APP] = command
    sys.argv = ["flower-superexec", *(argv if argv is not None else sys.argv[1:])]
    flower_superexec()


# --------------------------------------------------------------------------- ClientApp
class AppRejected(RuntimeError):
    """The site refused a run's app bundle (unsigned, altered or signed by another key)."""


def install_fab_verifier(public_key_path: str | Path) -> None:
    """Make this process's ``flwr-clientapp`` verify every FAB before installing it.

    Flower's ``run_clientapp`` pulls the task (message, context, run, FAB), then calls
    ``install_from_fab``. medfed wraps both names in that module: the pull records the task,
    the install first checks the signature with :func:`medfed.shared.app_signature.verify_app` against the
    run config the ClientApp would receive, and raises :class:`AppRejected` (so Flower answers
    the server with an error) instead of installing. After a successful check, the modules of the
    bundle's top-level packages (``medfed``: including this one, imported from the site's installed
    package) are dropped from ``sys.modules``, so Flower's ``load_app``, which puts the installed
    bundle's folder first on ``sys.path``, imports them again from the bundle.

    The third wrapped name, ``get_load_client_app_fn``, makes that a checked fact rather than an
    assumption: once the ClientApp is loaded, every loaded module of the bundle's packages must
    come from the bundle's install folder (``$FLWR_HOME/apps/<publisher>.<name>.<version>.<hash>``),
    else :class:`AppRejected` is raised before the ClientApp handles any message
    (:func:`check_code_origin`).

    Parameters
    ----------
    public_key_path
        The coordinator's ``app-signing.pub`` from the site's startup kit.
    """
    from flwr.supernode.runtime import run_clientapp as runtime

    from medfed.shared.app_signature import AppSignatureError, load_public_key, verify_app

    key = load_public_key(public_key_path)
    original_pull = runtime.pull_task_input
    original_install = runtime.install_from_fab
    original_loader = runtime.get_load_client_app_fn
    task: dict[str, Any] = {}

    def pull_task_input(client: Any) -> Any:
        message, context, run, fab = original_pull(client)
        task.update(context=context, run=run, fab=fab)
        return message, context, run, fab

    def install_from_fab(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        run, context, fab = task.get("run"), task.get("context"), task.get("fab")
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        run_id = getattr(run, "run_id", "?")
        if context is None or fab is None:
            raise AppRejected("no task was pulled before the app bundle install: refusing it.")
        try:
            digest = verify_app(content, context.run_config, claimed_hash=fab.hash_str, public_key=key)
        except AppSignatureError as err:
            logger.error("%s of run %s: %s The bundle was not installed.", REFUSED_TAG, run_id, err)
            raise AppRejected(f"site refused the app bundle: {err}") from None
        logger.info("verified app bundle %s... of run %s (coordinator signature ok)", digest[:12], run_id)
        packages = _top_level_packages(content)
        task["packages"] = packages
        _forget_modules(packages)
        return original_install(fab_file, *args, **kwargs)

    def get_load_client_app_fn(*args: Any, **kwargs: Any) -> Callable[[str, str, str], Any]:
        load = original_loader(*args, **kwargs)

        def load_client_app(fab_id: str, fab_version: str, fab_hash: str) -> Any:
            if "packages" not in task:
                raise AppRejected("the ClientApp was to be loaded before its bundle was verified: refusing it.")
            client_app = load(fab_id, fab_version, fab_hash)
            origin = check_code_origin(task["packages"], runtime.get_project_dir(fab_id, fab_version, fab_hash))
            logger.info("ClientApp code of run %s loaded from the verified bundle at %s",
                        getattr(task.get("run"), "run_id", "?"), origin)
            return client_app

        return load_client_app

    runtime.pull_task_input = pull_task_input
    runtime.install_from_fab = install_from_fab
    runtime.get_load_client_app_fn = get_load_client_app_fn


def check_code_origin(packages: set[str], app_dir: str | Path) -> Path:
    """Check that every loaded module of the bundle's ``packages`` was imported from ``app_dir``.

    Parameters
    ----------
    packages
        The bundle's top-level packages (``{"medfed"}`` for a ``medfed run`` bundle).
    app_dir
        The folder Flower installed the verified bundle into.

    Returns
    -------
    Path
        ``app_dir``, resolved.

    Raises
    ------
    AppRejected
        A module of those packages was imported from somewhere else (the site's installed copy of
        medfed, say): the code that would run is then not the code the coordinator signed.
    """
    root = Path(app_dir).resolve()
    for name, module in list(sys.modules.items()):
        if name.split(".", 1)[0] not in packages:
            continue
        origin = getattr(module, "__file__", None)
        if origin is None:
            continue  # a namespace package: no code of its own
        if not Path(origin).resolve().is_relative_to(root):
            logger.error("%s: module %s was imported from %s, not from the verified bundle at %s.",
                         REFUSED_TAG, name, origin, root)
            raise AppRejected(  # sent to the server: no site paths in it (they are in the site's log)
                f"module {name} was not imported from the verified app bundle: the site would not run "
                "the code the coordinator signed, so it refuses the task."
            )
    return root


def _top_level_packages(fab: bytes) -> set[str]:
    with zipfile.ZipFile(BytesIO(fab)) as archive:
        return {n.split("/", 1)[0] for n in archive.namelist() if n.endswith("/__init__.py") and n.count("/") == 1}


def _forget_modules(packages: set[str]) -> None:
    for name in list(sys.modules):
        if name.split(".", 1)[0] in packages:
            del sys.modules[name]


def verified_clientapp_main() -> None:
    """``medfed-clientapp``: Flower's ``flwr-clientapp`` with the FAB signature check.

    Reads the public key path from :data:`SIGNING_KEY_ENV` (set by ``medfed site start``);
    without it, nothing runs.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("medfed %(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # Flower configures its own logging; keep medfed's lines single
    key_path = os.environ.get(SIGNING_KEY_ENV, "")
    if not key_path:
        logger.error(
            "%s is not set: medfed-clientapp runs only under `medfed site start`, which points it "
            "at the kit's app-signing.pub. Refusing to run any app bundle.", SIGNING_KEY_ENV,
        )
        raise SystemExit(2)
    install_fab_verifier(key_path)
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    flwr_clientapp()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "superexec":
        superexec_main(sys.argv[2:])
    else:
        raise SystemExit("usage: python -m medfed.client.deploy superexec [flower-superexec options]")
