"""One worker thread owns the model: it takes the requests waiting when it is free (up to `max_batch_size`) and
answers them together in one generate call. Requests arriving meanwhile wait for the next group."""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Optional

from loraforge.infer.server.engine import FINISH_CANCELLED, Job

# How long the worker, woken by a request, waits for others sent at the same moment (two clients starting
# together share the first batch instead of one waiting out the other's whole reply).
GATHER_SECONDS = 0.02


class QueueFull(Exception):
    """More requests are waiting than the server takes (`max_waiting`)."""


class Scheduler:
    def __init__(self, engine, max_batch_size: int = 8, max_waiting: int = 64):
        self.engine = engine
        self.max_batch_size = max_batch_size if engine.batching else 1
        self.max_waiting = max_waiting
        self.waiting: deque[Job] = deque()
        self.condition = threading.Condition()
        self.stopping = False
        self.running: list[Job] = []
        self.thread: Optional[threading.Thread] = None
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # the sizes of the latest batches, for /health
        self.answered = 0
        self.cancelled = 0  # jobs ended because their client left
        self.generated_tokens = 0

    def start(self) -> None:
        self.thread = threading.Thread(target=self._work, name="loraforge-serve-worker", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.condition:
            self.stopping = True
            for job in (*self.waiting, *self.running):
                job.cancel()
            self.condition.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self.condition:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(job)
            self.condition.notify()

    def stats(self) -> dict:
        with self.condition:
            sizes = list(self.batch_sizes)
            return {"waiting": len(self.waiting), "running": len(self.running), "answered": self.answered,
                    "cancelled": self.cancelled, "generated_tokens": self.generated_tokens, "batches": len(sizes),
                    "largest_batch": max(sizes, default=0), "max_batch_size": self.max_batch_size}

    def _next_batch(self) -> Optional[list[Job]]:
        with self.condition:
            while not self.waiting and not self.stopping:
                self.condition.wait()
            if self.stopping:
                return None
        time.sleep(GATHER_SECONDS)
        with self.condition:
            batch = []
            while self.waiting and len(batch) < self.max_batch_size:
                job = self.waiting.popleft()
                if job.cancelled.is_set():  # its client left while it waited
                    job.finish_reason = FINISH_CANCELLED
                    job.complete()
                    self.cancelled += 1
                else:
                    batch.append(job)
            self.running = batch
            return batch

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:
                continue
            error = None
            try:
                self.engine.run(batch)
            except Exception as e:  # the server keeps serving; each request of the batch gets the error
                error = e
            for job in batch:
                job.complete(error)
            with self.condition:
                self.batch_sizes.append(len(batch))
                self.answered += len(batch)
                self.cancelled += sum(job.finish_reason == FINISH_CANCELLED for job in batch)
                self.generated_tokens += sum(job.completion_tokens for job in batch)
                self.running = []
