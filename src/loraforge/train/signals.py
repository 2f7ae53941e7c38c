"""SIGTERM/SIGINT: the first asks the loop to finish its step and checkpoint; the second exits at once.

Exiting at once is safe: checkpoints only appear by an atomic rename, so an interrupted save
leaves a `.tmp-*` folder that is never picked up, and the last good checkpoint untouched.
"""
from __future__ import annotations

import os
import signal
import threading
import time

ECHO_S = 2.0  # under a launcher, the same signal again this soon is the launcher passing on a Ctrl-C


def _say(text: str) -> None:
    # os.write, not print: a handler that prints while the interrupted code is printing to the same
    # stream raises "reentrant call" inside the buffered writer.
    try:
        os.write(2, text.encode())
    except OSError:
        pass


class StopOnSignal:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, announce: bool = True):
        self.signum: int | None = None
        self._previous = {}
        self._announce = announce  # False on the ranks other than 0 of a multi-device run
        self._at = 0.0
        # A terminal's Ctrl-C reaches every rank, and then the launcher passes it on once more.
        self._echoes = "RANK" in os.environ and "WORLD_SIZE" in os.environ

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None:
            if self._echoes and signum == self.signum and time.monotonic() - self._at < ECHO_S:
                return
            _say(f"\nsecond signal {signum}: exiting now; the last complete checkpoint is intact\n")
            raise SystemExit(128 + signum)
        self.signum, self._at = signum, time.monotonic()
        if self._announce:
            _say(f"\nsignal {signum} received: finishing this step and saving a checkpoint "
                 "(send it again to exit at once)\n")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False
