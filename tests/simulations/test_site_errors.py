"""A site failure's traceback once: Flower's three ERROR records per failure (flwr 1.42's
simulation engine) become one log entry per distinct error, and repeats are counted."""

from __future__ import annotations

import logging

import pytest

from medfed.simulations.site_errors import SiteError, root_error, site_error_log, site_traceback

# What flwr 1.42's vce_api.worker logs for a site whose client_fn raised (from a real run, shortened).
RAY_TASK_ERROR = """\x1b[36mray::ClientAppActor.run()\x1b[39m (pid={pid}, ip=192.0.2.2, actor_id=93f4, repr=<ClientAppActor>)
  File "/venv/flwr/clientapp/client_app.py", line 144, in __call__
    return self._call(message, context)
  File "/repo/tests/support/failing_sites.py", line 17, in _import_fails
    raise ImportError("No module named 'x'")
{error}

The above exception was the direct cause of the following exception:

\x1b[36mray::ClientAppActor.run()\x1b[39m (pid={pid}, ip=192.0.2.2, actor_id=93f4, repr=<ClientAppActor>)
  File "/venv/flwr/simulation/ray_transport/ray_actor.py", line 65, in run
    raise ClientAppException(str(ex)) from ex
flwr.clientapp.client_app.ClientAppException: 
Exception ClientAppException occurred. Message: {message}"""

TRACEBACK = """Traceback (most recent call last):
  File "/venv/flwr/server/superlink/fleet/vce/vce_api.py", line 132, in worker
    out_mssg, updated_context = backend.process_message(message, context)
                                ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/venv/ray/_private/worker.py", line 1023, in get_objects
    raise value.as_instanceof_cause()
ray.exceptions.RayTaskError(ClientAppException): """ + RAY_TASK_ERROR


class FakeRayTaskError(Exception):
    """Stands for ``RayTaskError(ClientAppException)``: Flower logs the exception object itself."""


def _flower_logs_a_failure(pid: int, error: str) -> None:
    """The three records ``RayBackend.process_message`` and ``vce_api.worker`` log per failure."""
    flwr_logger = logging.getLogger("flwr")
    message = error.split(": ", 1)[1]
    flwr_logger.error("An exception was raised when processing a message by %s", "RayBackend")
    flwr_logger.error(FakeRayTaskError(RAY_TASK_ERROR.format(pid=pid, error=error, message=message)))
    flwr_logger.error(TRACEBACK.format(pid=pid, error=error, message=message))


def test_each_distinct_failure_is_logged_once_and_repeats_are_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with site_error_log() as errors:
        for round_ in range(3):
            for pid in (11, 12, 13, 14):
                _flower_logs_a_failure(pid, "ImportError: No module named 'x'")
        _flower_logs_a_failure(15, "RuntimeError: CUDA out of memory")
        logging.getLogger("flwr").error("An exception occured!! the simulation engine itself")  # not a site's
    flwr_records = [r for r in caplog.records if r.name == "flwr"]
    assert [r.getMessage() for r in flwr_records] == ["An exception occured!! the simulation engine itself"]
    mine = [r for r in caplog.records if r.name == "medfed.simulations.site_errors"]
    assert len(mine) == 2 and all(r.levelno == logging.ERROR for r in mine)
    first = mine[0].getMessage()
    assert first.startswith("a site failed: ImportError: No module named 'x' (its traceback is shown once")
    assert "failing_sites.py\", line 17, in _import_fails" in first
    assert "vce_api.py" not in first and "\x1b[" not in first  # the site's part only, no colour codes
    assert caplog.text.count("Traceback") == 2  # one per distinct error, not 26
    assert errors.first == SiteError("ImportError", "No module named 'x'")
    assert errors.total() == 13
    assert errors.repeats() == [(SiteError("ImportError", "No module named 'x'"), 12)]
    # Removed after the block: Flower's records pass again.
    logging.getLogger("flwr").error("An exception was raised when processing a message by %s", "RayBackend")
    assert caplog.records[-1].name == "flwr"


def test_the_root_error_is_the_sites_own_not_flowers_wrappers() -> None:
    text = TRACEBACK.format(pid=1, error="medfed.shared.data.base.DataError: tiny.npz lacks val_images",
                            message="tiny.npz lacks val_images")
    assert root_error(text) == SiteError("DataError", "tiny.npz lacks val_images")
    assert root_error("no error line here") is None
    body = site_traceback(text)
    assert body.startswith("Traceback at the site (most recent call last):\n  File \"/venv/flwr/clientapp")
    assert body.endswith("DataError: tiny.npz lacks val_images")
