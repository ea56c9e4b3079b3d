"""Stopping a run cleanly: SIGINT / SIGTERM ask the trainer to checkpoint and stop after the step."""

from __future__ import annotations

import signal
import threading

from ..core.errors import BalconyError


class TrainingInterrupted(BalconyError, KeyboardInterrupt):
    """Training stopped by a signal after writing a checkpoint; `resume=True` continues it."""


class StopSignals:
    """While entered, SIGINT and SIGTERM are noted in `received` instead of killing the process; a
    second one stops at once. Only the main thread can take signals: elsewhere this does nothing."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame) -> None:
        self.received = signum
        signal.signal(signum, self._previous.get(signum) or signal.SIG_DFL)

    def __exit__(self, *exc) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous = {}
