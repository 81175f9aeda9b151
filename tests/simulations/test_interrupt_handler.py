""":func:`medfed.simulations.interrupt.interruptible` in-process: the caller's ``on_signal`` runs
before the ``KeyboardInterrupt``, the signal is noted, and the previous handlers come back."""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest

from medfed.simulations.interrupt import interruptible


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_on_signal_runs_before_the_keyboard_interrupt(sig: signal.Signals) -> None:
    events: list[str] = []
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(KeyboardInterrupt):
            with interruptible(on_signal=lambda: events.append("on_signal")) as state:
                try:
                    os.kill(os.getpid(), sig)
                    time.sleep(5)  # the handler interrupts this
                except KeyboardInterrupt:
                    events.append("KeyboardInterrupt")
                    raise
        assert events == ["on_signal", "KeyboardInterrupt"]
        assert state.signal_name == sig.name
        assert {s: signal.getsignal(s) for s in before} == before
    finally:
        logging.disable(logging.NOTSET)  # the handler silenced logging for the unwinding
