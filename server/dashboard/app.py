"""The coordinator dashboard: a FastAPI app over the run store.

Pages (``/`` the runs, ``/runs/{id}`` one run, ``/runs/{id}/report`` its model card, written by
:mod:`medfed.server.report` from the run directory) are static HTML whose JavaScript polls the JSON
API under ``/api`` every 1.5 s and redraws in place; the chart library (plotly.js) is served
from the installed ``plotly`` package, so the dashboard works with no internet. The OpenAPI
schema is at ``/api/openapi.json``.

Every request, pages, scripts and the schema included, needs the bearer token: an
``Authorization: Bearer <token>`` header, or the cookie set when a browser opens
``/?token=<token>`` (the URL ``medfed dashboard`` prints; the token is then removed from the
address bar). Anything else is answered ``401``. The app only reads the store, which holds
only what the server already has: no images, no patient identifiers, no data paths.
"""


import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Self
from urllib.parse import urlencode

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from sqlalchemy.engine import make_url

from medfed.server.dashboard.read_models import RunReader
from medfed.server.dashboard.run_reports import RunReports
from medfed.server.store import RunStore

__all__ = [
    "COOKIE",
    "DEFAULT_HOST",
    "BackgroundServer",
    "create_app",
    "default_token_path",
    "load_or_create_token",
    "plotly_js_path",
]

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
COOKIE = "medfed_dashboard"
_HERE = Path(__file__).parent
_PAGES = _HERE / "pages"
_STATIC = _HERE / "static"
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


# --------------------------------------------------------------------------- token
def default_token_path(store_url: str) -> Path:
    """``dashboard.token`` next to an SQLite store; ``~/.medfed/dashboard.token`` otherwise."""
    url = make_url(store_url)
    if url.get_backend_name() == "sqlite" and url.database:
        return Path(url.database).parent / "dashboard.token"
    return Path.home() / ".medfed" / "dashboard.token"


def load_or_create_token(path: str | Path, *, create: bool = True) -> str:
    """Read the bearer token at ``path``; generate one there (mode 0600) if it is missing.

    Parameters
    ----------
    path
        The token file (one line). ``medfed provision`` may write it for the coordinator.
    create
        Generate a missing file (``False``: a missing file is an error).

    Raises
    ------
    FileNotFoundError
        If the file is missing and ``create`` is false.
    ValueError
        If the file holds fewer than 16 characters.
    """
    path = Path(path)
    if not path.exists():
        if not create:
            raise FileNotFoundError(
                f"token file {path} does not exist: give the coordinator token file written by "
                "provisioning, or leave --token-file out to generate one."
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        logger.info("generated a dashboard token in %s (mode 0600)", path)
        return token
    if path.stat().st_mode & 0o077:
        logger.warning("token file %s is readable by other users: run `chmod 600 %s`", path, path)
    token = path.read_text().strip()
    if len(token) < 16:
        raise ValueError(f"token file {path} holds a token shorter than 16 characters: use a longer random one.")
    return token


def plotly_js_path() -> Path:
    """``plotly.min.js`` shipped inside the installed ``plotly`` package."""
    path = Path(str(resources.files("plotly") / "package_data" / "plotly.min.js"))
    if not path.is_file():
        raise FileNotFoundError(
            f"plotly.min.js is not at {path}: reinstall medfed's pinned plotly (`pip install -e .`)."
        )
    return path


# --------------------------------------------------------------------------- API models
class RunOut(BaseModel):
    """A run in the runs list."""

    id: str
    mode: str = Field(description="federated | pooled")
    status: str = Field(description="running | finished | failed | stale (running, no write for 15 min)")
    started: float = Field(description="Unix time")
    finished: float | None
    last_update: float
    planned_rounds: int
    num_sites: int | None
    current_round: int = Field(description="The round most recently started")
    rounds_done: int = Field(description="Rounds finished (the initial evaluation, round 0, not counted)")
    model: str | None
    strategy: str | None
    dataset: str | None = Field(description="'synthetic', 'deployment' or a file name (never a path)")
    error: str | None


class CheckpointOut(BaseModel):
    kind: str
    round: int
    metrics: dict[str, float]
    saved: float


class RunDetailOut(RunOut):
    """One run with its config (data paths reduced to file names), versions and summary."""

    config: dict[str, Any]
    versions: dict[str, str]
    summary: dict[str, Any] | None
    checkpoints: list[CheckpointOut]
    last_event_id: int


class SecAggOut(BaseModel):
    sampled: int | None = None
    survivors: int | None = None
    dropped: int | None = None
    completed: bool
    failed_stage: str | None = None
    seconds: float | None = None
    active_after_stage: dict[str, int] = {}


class RoundOut(BaseModel):
    """One round. ``global_metrics``: the server's evaluation of the aggregated model (absent in
    deployment, where ``eval_metrics``, the sites' weighted validation, stand in)."""

    round: int
    status: str = Field(description="running | finished")
    started: float
    finished: float | None
    seconds: float | None
    selected: int | None = Field(description="Sites asked to train")
    responded: int = Field(description="Sites that returned a result")
    failures: int
    global_metrics: dict[str, float]
    fit_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    secagg: SecAggOut | None


class SiteOut(BaseModel):
    """One site's latest state."""

    site: str
    last_round: int
    last_seen: float
    num_examples: float | None
    local_metrics: dict[str, float] = Field(description="The site's latest validation metrics")
    local_metrics_round: int | None
    train_metrics: dict[str, float]
    epsilon: float | None = Field(description="Privacy spent (cumulative epsilon); null without DP")
    budget_epsilon: float | None
    rounds_participated: int
    rounds_declined: int = Field(description="Rounds declined to stay within the privacy budget")
    rounds_refused: int = Field(
        0, description="Rounds in which the site refused the run: it asks for less privacy than the site's policy"
    )
    rounds_missed: int = Field(description="Finished rounds, after its first, with no result from the site")


class FairnessPoint(BaseModel):
    round: int
    best: float
    worst: float
    gap: float
    best_site: str
    worst_site: str
    sites: int


class FairnessOut(BaseModel):
    """Best and worst site per round on the primary local metric."""

    metric: str | None
    higher_is_better: bool
    rounds: list[FairnessPoint]


class SecAggRoundOut(BaseModel):
    round: int
    enabled: bool
    secagg: SecAggOut | None


class CrossSiteGroupOut(BaseModel):
    key: str = Field(description="Metadata key (sex, age, scanner...)")
    value: str = Field(description="The subgroup (F, M, <40, 40-59, 60+, a scanner...)")
    n: int
    metrics: dict[str, float]


class CrossSiteSiteOut(BaseModel):
    site: str
    n: int = Field(description="Images in the site's local test split")
    metrics: dict[str, float]
    subgroups: list[CrossSiteGroupOut]
    suppressed: int = Field(description="Subgroups below the minimum count: not reported")


class CrossSiteGapOut(BaseModel):
    key: str
    metric: str
    best_value: str
    best: float
    worst_value: str
    worst: float
    gap: float


class CrossSiteOut(BaseModel):
    """Every site's evaluation of a checkpoint on its own local test split (``cross_site.json``)."""

    checkpoint: str
    round: int
    task: str
    min_count: int
    sites: list[CrossSiteSiteOut]
    gaps: list[CrossSiteGapOut] = Field(description="Per key and metric: best and worst subgroup, pooled over sites")


class EventOut(BaseModel):
    id: int
    time: float
    level: str
    kind: str
    round: int | None
    message: str


# --------------------------------------------------------------------------- app
def _store_folder(store: RunStore) -> list[Path]:
    """The folder of an SQLite store (where ``medfed simulate`` writes its run directories too)."""
    url = make_url(str(store.url))
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return [Path(url.database).parent]
    return []


def create_app(*, store: RunStore, token: str, runs_roots: list[Path] | None = None) -> FastAPI:
    """The dashboard app over ``store``, guarded by ``token``.

    Parameters
    ----------
    store
        An open run store (only read).
    token
        The bearer token every request must carry (header or cookie).
    runs_roots
        Folders holding run directories, for the model cards (``/runs/{id}/report``); each run's
        recorded ``run-dir`` is tried first. Default: the folder of an SQLite store.
    """
    if len(token) < 16:
        raise ValueError("the dashboard token must be at least 16 characters long.")
    app = FastAPI(
        title="medfed dashboard",
        description="Live view of medfed federated runs, read from the run store.",
        version="1",
        docs_url=None,  # Swagger UI and ReDoc load from a CDN: the schema is served instead
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    expected = token.encode()

    def _valid(candidate: str | None) -> bool:
        return bool(candidate) and secrets.compare_digest(candidate.encode(), expected)

    @app.middleware("http")
    async def require_token(request: Request, call_next: Any) -> Response:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        from_query = request.query_params.get("token")
        if (scheme.lower() == "bearer" and _valid(value.strip())) or _valid(request.cookies.get(COOKIE)):
            response = await call_next(request)
        elif from_query is not None and _valid(from_query) and request.method == "GET":
            # A browser opening the printed URL: keep the token in an HttpOnly cookie and drop
            # it from the address bar (and so from history and Referer headers).
            query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
            target = request.url.path + (f"?{query}" if query else "")
            response = RedirectResponse(target, status_code=303)
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
        else:
            response = JSONResponse(
                {"detail": "authentication required: open the URL printed by `medfed dashboard`, "
                           "or send 'Authorization: Bearer <token>' (the token file it names)."},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="medfed dashboard"'},
            )
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    reader = RunReader(store)
    reports = RunReports(_store_folder(store) if runs_roots is None else runs_roots)

    def get_store() -> RunReader:
        return reader

    StoreDep = Annotated[RunReader, Depends(get_store)]
    RunId = Annotated[str, PathParam(description="The run's id (its run directory's name)", max_length=200)]

    def _run_or_404(s: RunReader, run_id: str) -> dict[str, Any]:
        run = s.get_run(run_id)
        if run is None:
            raise HTTPException(status_code=404, detail=f"no run {run_id!r} in the store: see /api/runs")
        return run

    @app.get("/api/runs", response_model=list[RunOut], tags=["runs"], summary="All runs, newest first")
    def api_runs(s: StoreDep) -> list[dict[str, Any]]:
        return s.list_runs()

    @app.get("/api/runs/{run_id}", response_model=RunDetailOut, tags=["runs"], summary="One run: status, config, summary")
    def api_run(run_id: RunId, s: StoreDep) -> dict[str, Any]:
        return _run_or_404(s, run_id)

    @app.get("/api/runs/{run_id}/rounds", response_model=list[RoundOut], tags=["runs"],
             summary="Rounds with global metrics (round 0: the initial model)")
    def api_rounds(run_id: RunId, s: StoreDep) -> list[dict[str, Any]]:
        _run_or_404(s, run_id)
        return s.rounds(run_id)

    @app.get("/api/runs/{run_id}/sites", response_model=list[SiteOut], tags=["runs"],
             summary="Per-site table: last seen, examples, local metrics, epsilon, dropouts")
    def api_sites(run_id: RunId, s: StoreDep) -> list[dict[str, Any]]:
        _run_or_404(s, run_id)
        return s.sites(run_id)

    @app.get("/api/runs/{run_id}/fairness", response_model=FairnessOut, tags=["runs"],
             summary="Gap between the best and the worst site per round")
    def api_fairness(run_id: RunId, s: StoreDep) -> dict[str, Any]:
        _run_or_404(s, run_id)
        return s.fairness(run_id)

    @app.get("/api/runs/{run_id}/cross-site", response_model=CrossSiteOut | None, tags=["runs"],
             summary="Cross-site evaluation: one row per site and subgroup, subgroup gaps (null: none yet)")
    def api_cross_site(
        run_id: RunId,
        s: StoreDep,
        checkpoint: Annotated[str, Query(max_length=40, description="final, best, ...")] = "final",
    ) -> dict[str, Any] | None:
        _run_or_404(s, run_id)
        return s.cross_site(run_id, checkpoint=checkpoint)

    @app.get("/api/runs/{run_id}/secagg", response_model=list[SecAggRoundOut], tags=["runs"],
             summary="SecAgg+ status per round")
    def api_secagg(run_id: RunId, s: StoreDep) -> list[dict[str, Any]]:
        _run_or_404(s, run_id)
        return [
            {"round": r["round"], "enabled": r["secagg"] is not None, "secagg": r["secagg"]}
            for r in s.rounds(run_id)
            if r["round"] > 0
        ]

    @app.get("/api/runs/{run_id}/events", response_model=list[EventOut], tags=["runs"],
             summary="Event log (round start/end, failures, declines, warnings, errors)")
    def api_events(
        run_id: RunId,
        s: StoreDep,
        after: Annotated[int, Query(ge=0, description="Only events with a larger id")] = 0,
        limit: Annotated[int, Query(ge=1, le=5000)] = 500,
    ) -> list[dict[str, Any]]:
        _run_or_404(s, run_id)
        return s.events(run_id, after=after, limit=limit)

    # ---------------------------------------------------------------- pages and assets
    @app.get("/", include_in_schema=False)
    def page_runs() -> FileResponse:
        return FileResponse(_PAGES / "runs.html", media_type="text/html")

    @app.get("/runs/{run_id}", include_in_schema=False)
    def page_run(run_id: RunId) -> FileResponse:
        return FileResponse(_PAGES / "run.html", media_type="text/html")

    @app.get("/runs/{run_id}/report", include_in_schema=False)
    def page_report(run_id: RunId, s: StoreDep) -> HTMLResponse:
        from medfed.server.model_card import ReportError

        run = _run_or_404(s, run_id)
        run_dir = reports.locate(run_id, run.get("config") or {})
        if run_dir is None:
            raise HTTPException(
                status_code=404,
                detail=f"run {run_id}'s directory is not on this machine (looked under its run-dir and "
                       "the store's folder): run `medfed report RUN_DIR` where it is.",
            )
        try:
            return HTMLResponse(reports.html(run_dir))
        except ReportError as err:
            raise HTTPException(status_code=500, detail=f"the model card cannot be written: {err}") from None

    plotly_js = plotly_js_path()

    @app.get("/static/vendor/plotly.min.js", include_in_schema=False)
    def vendor_plotly() -> FileResponse:
        return FileResponse(plotly_js, media_type="text/javascript")

    app.mount("/static", StaticFiles(directory=_STATIC), name="static")
    return app


# --------------------------------------------------------------------------- serving
class BackgroundServer:
    """Serve ``app`` with uvicorn on a thread (tests, notebooks); stop with :meth:`stop`.

    Parameters
    ----------
    app
        The ASGI app.
    host
        Bind address (default ``127.0.0.1``: this machine only).
    port
        ``0`` picks a free port; :attr:`port` tells which.
    """

    def __init__(self, app: FastAPI, *, host: str = DEFAULT_HOST, port: int = 0) -> None:
        self.host = host
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        self.socket = sock
        self.port: int = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", ws="none")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:8765``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, *, timeout: float = 20.0) -> "BackgroundServer":
        """Start serving; return once the server accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the dashboard did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.socket.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def serve_in_background(app: FastAPI, *, host: str = DEFAULT_HOST, port: int = 0) -> Iterator[BackgroundServer]:
    """``with serve_in_background(app) as server: ... server.url``: always stopped on exit."""
    server = BackgroundServer(app, host=host, port=port)
    server.start()
    try:
        yield server
    finally:
        server.stop()
