"""The progress bar (step, loss, learning rate, tokens/s, ETA) and periodic log lines, with rich."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total_steps: int, start_step: int, console: Console | None):
        self.console = console or Console()
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, transient=False)
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step,
                                             loss="-", lr="-", tps="-")
        # tokens/s over the logging window: one step's rate swings with its rows' lengths (74-1,461)
        self._window_tokens, self._window_seconds = 0, 0.0

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, *exc):
        self._progress.stop()
        return False

    def update(self, step: int, record: dict) -> None:
        if record.get("tokens") and record.get("tokens_per_s"):
            self._window_tokens += record["tokens"]
            self._window_seconds += record["tokens"] / record["tokens_per_s"]
        self._progress.update(self._task, completed=step, loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                              tps=f"{self.window_tokens_per_s(record):.0f}")

    def window_tokens_per_s(self, record: dict) -> float:
        """Tokens per second since the last log line (the step's own rate before any step is counted)."""
        return self._window_tokens / self._window_seconds if self._window_seconds else record["tokens_per_s"]

    def log_line(self, record: dict) -> None:
        if not self.console.is_terminal:  # a terminal already shows the live bar
            self.console.print(f"step {record['step']}: loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                               f"grad norm {record['grad_norm']:.3f}  {self.window_tokens_per_s(record):.0f} tok/s")
        self._window_tokens, self._window_seconds = 0, 0.0
