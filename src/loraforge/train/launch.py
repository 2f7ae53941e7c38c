"""`loraforge train --devices N`: start N ranks of the same command with torch's elastic launcher.

The same agent as `torchrun --standalone --nproc-per-node N` (torch.distributed.launcher), run in
this process: it sets RANK / WORLD_SIZE / MASTER_ADDR for each worker (`python -m loraforge train
...`, which joins the group: train/distributed.py), watches them, and when one dies stops the
others (SIGTERM, then SIGKILL after 30 s) so that nothing hangs. A SIGTERM or Ctrl-C here is passed
on to every rank: they finish the same step, rank 0 writes one checkpoint, all exit.
"""
from __future__ import annotations

import inspect
import logging
import os
import signal
import sys
import uuid

STOP_CODES = {128 + signal.SIGTERM, 128 + signal.SIGINT}
SHUTDOWN_TIMEOUT_S = 600  # after a SIGTERM, how long the ranks may take to finish the step and checkpoint
# The Hub token of `--set model.hub_token` for the ranks: any user of the machine can read a process's argv,
# only its owner its environment.
HUB_TOKEN_ENV = "LORAFORGE_HUB_TOKEN"


def take_hub_token(cfg) -> None:
    """In a rank: the token the launcher handed over (HUB_TOKEN_ENV) becomes model.hub_token; the variable is
    removed, so nothing this rank starts inherits it."""
    token = os.environ.pop(HUB_TOKEN_ENV, None)
    if token and not cfg.model.hub_token:
        cfg.model.hub_token = token


def launch(devices: int, worker_args: list[str], say, env: dict[str, str] | None = None) -> int:
    """Run `python -m loraforge train WORKER_ARGS` on `devices` ranks, with `env` added to their environment;
    return the exit status for the CLI."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in list(logging.root.manager.loggerDict):  # each of torch's elastic modules sets its own level
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)  # our own message says what happened
    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun does: N ranks must not each take every core
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // devices))
    # shutdown_timeout (SIGTERM, then SIGKILL after it) is newer than torch 2.11; older ones keep their default.
    grace = {"shutdown_timeout": SHUTDOWN_TIMEOUT_S} \
        if "shutdown_timeout" in inspect.signature(LaunchConfig).parameters else {}
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=devices, run_id=f"loraforge-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.1,
                          **grace)
    os.environ.update(env or {})  # the ranks inherit this process's environment
    try:
        elastic_launch(config, sys.executable)("-m", "loraforge", "train", *worker_args)
        return 0
    except SignalException as e:  # the ranks got the signal too and stopped with a checkpoint (rank 0 said where)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        codes = {failure.exitcode for failure in e.failures.values()}
        # Ranks that had already said their last word may be ended by the launcher's SIGTERM.
        chosen = codes - {-signal.SIGTERM}
        if chosen and chosen <= STOP_CODES:  # a signal sent to a rank: all stopped after one step
            return max(chosen)
        if chosen == {2}:  # a mistake in the input: rank 0 printed it
            return 2
        rank, failure = min(e.failures.items(), key=lambda kv: kv[1].timestamp)
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with status {failure.exitcode}")
        say(f"training failed: rank {rank} of {devices} {how}; the other ranks were stopped. The newest complete "
            "checkpoint (if any) is intact: rerun with --resume to continue from it")
        return 1
    finally:
        for name in env or {}:
            os.environ.pop(name, None)
