"""SIGTERM/SIGINT: the first asks the loop to finish its step and checkpoint; the second exits at once.

Exiting at once is safe: checkpoints only appear by an atomic rename, so an interrupted save
leaves a `.tmp-*` folder that is never picked up, and the last good checkpoint untouched.
"""
from __future__ import annotations

import signal
import sys
import threading


class StopOnSignal:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None:
            print(f"\nsecond signal {signum}: exiting now; the last complete checkpoint is intact", file=sys.stderr)
            raise SystemExit(128 + signum)
        self.signum = signum
        print(f"\nsignal {signum} received: finishing this step and saving a checkpoint "
              "(send it again to exit at once)", file=sys.stderr)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False
