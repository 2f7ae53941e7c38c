"""More than one device: which rank this process is, its share of each step, and the collectives.

Launching (`loraforge train --devices N`, torchrun, accelerate launch) sets RANK / WORLD_SIZE /
LOCAL_RANK; each process then runs the same loop on its share of every optimizer step:

- the global batch stays what the config says (micro_batch_size x gradient_accumulation rows);
  the step's rows are dealt to the ranks in contiguous slices, each rank running passes of at most
  micro_batch_size rows;
- every rank divides its token-loss sums by the trained tokens of the *whole* step (all ranks), and
  the gradient reduction (DDP's all-reduce, FSDP2's reduce-scatter) averages over ranks, so the
  loss is scaled by the world size: the gradient is the global token mean, exactly as on one device;
- ddp: accelerate wraps the model in DistributedDataParallel (only LoRA parameters have gradients);
  fsdp: torch's FSDP2 `fully_shard` shards each decoder layer and the root (4-bit weights stored in
  the compute dtype, bitsandbytes' quant_storage, so they can be sharded), optional CPU offload.

Rank 0 alone writes files; the others compute. Checkpoints hold rank 0's files plus each other
rank's random state (`rng-rank{r}.pt`) and the world size, which a resume must match.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch

from loraforge.errors import UserError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mode: str = "single"  # "single" | "ddp" | "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    @property
    def collective(self) -> bool:
        """Whether a process group exists (also for fsdp on one device)."""
        return self.mode != "single"


def launched() -> bool:
    """True inside a process started by torchrun / accelerate launch / `--devices N`."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@functools.lru_cache(maxsize=None)  # read once per process: start() removes accelerate's FSDP switch
def env_ranks(distributed: str) -> Ranks:
    if not launched():
        return Ranks()
    world = int(os.environ["WORLD_SIZE"])
    # `accelerate launch` with an FSDP config means fsdp unless the config says otherwise.
    from_accelerate = distributed == "auto" and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    mode = "fsdp" if distributed == "fsdp" or from_accelerate else ("ddp" if world > 1 else "single")
    return Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", 0)), mode)


def start(ranks: Ranks, device: str) -> str:
    """Join the process group; return this rank's device ("cuda:LOCAL_RANK" on GPUs)."""
    import torch.distributed as dist

    os.environ.pop("ACCELERATE_USE_FSDP", None)  # loraforge shards the model itself (shard below)
    if device.startswith("cuda") and ranks.collective:
        torch.cuda.set_device(ranks.local_rank)
        device = f"cuda:{ranks.local_rank}"
    if ranks.collective and not dist.is_initialized():
        # gloo next to NCCL: object broadcasts and small CPU reductions work on either device.
        dist.init_process_group("cuda:nccl,cpu:gloo" if device.startswith("cuda") else "gloo")
    return device


def stop() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(ranks: Ranks, value):
    """Rank 0's `value` on every rank."""
    if not ranks.collective:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ranks: Ranks) -> None:
    if ranks.collective:
        import torch.distributed as dist

        dist.barrier()


def step_totals(ranks: Ranks, loss: torch.Tensor, tokens: int, signum: Optional[int]) -> tuple[float, int, Optional[int]]:
    """The step's loss and tokens summed over ranks, and a stop signal any rank received."""
    if not ranks.collective:
        return float(loss), tokens, signum
    import torch.distributed as dist

    # float64 holds the token count exactly; the loss sum of ranks is the step's global token mean.
    t = torch.tensor([float(loss), float(tokens)], dtype=torch.float64)
    signals = torch.tensor([signum or 0], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    dist.all_reduce(signals, op=dist.ReduceOp.MAX)
    return float(t[0]), int(t[1]), int(signals.item()) or None


def share(micro_batches: list[list], ranks: Ranks, micro_batch_size: int, split=None) -> list[tuple[list, float]]:
    """This rank's passes of one step, as (rows, weight): weight 0 marks a pass that only keeps the
    collectives in step (a rank left without rows; under FSDP every rank must run as many passes)."""
    if ranks.world == 1:
        passes = [part for rows in micro_batches for part in (split(rows) if split else [rows])]
        return [(rows, 1.0) for rows in passes]
    rows = [r for mb in micro_batches for r in mb]
    per_rank = []
    for r in range(ranks.world):
        mine = rows[len(rows) * r // ranks.world:len(rows) * (r + 1) // ranks.world]
        passes = [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
        per_rank.append([part for p in passes for part in (split(p) if split else [p])])
    count = max(len(p) for p in per_rank) if ranks.sharded else 1
    own = [(p, 1.0) for p in per_rank[ranks.rank]]
    return own + [(rows[:1], 0.0)] * (count - len(own))


def gradient_scale(ranks: Ranks) -> float:
    """DDP and FSDP average gradients over ranks; each rank's loss already is its share of the global mean."""
    return float(ranks.world)


# --- FSDP2 -------------------------------------------------------------------------------------

def shard(model, ranks: Ranks, offload: bool):
    """FSDP2 on each decoder layer, then the root; the model stays the same object (sharded in place)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    if offload and not torch.cuda.is_available():
        raise UserError("train.fsdp_cpu_offload moves GPU shards to CPU memory; without a GPU they are there already: "
                        "leave it false")
    policy = CPUOffloadPolicy() if offload else OffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, offload_policy=policy)
    fully_shard(model, offload_policy=policy)
    return model


def decoder_layers(model) -> list:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(inner, "model", None)
    layers = getattr(body, "layers", None)
    if layers is None:
        raise UserError("train.distributed: fsdp needs a decoder with model.layers (Llama-family); use ddp")
    return list(layers)


def adapter_state(model, ranks: Ranks) -> Optional[dict]:
    """FSDP: the full LoRA weights gathered to CPU (every rank calls it; only the trainable parameters
    travel, never the 4-bit base). Otherwise None: the unwrapped model saves its own."""
    if not ranks.sharded:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=True))


def optimizer_state(model, optimizer, ranks: Ranks) -> Optional[dict]:
    """FSDP: the full optimizer state gathered to CPU (every rank calls it); otherwise None (rank 0's own)."""
    if not ranks.sharded:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, _inner(optimizer), options=StateDictOptions(full_state_dict=True,
                                                                                       cpu_offload=True))


def load_adapter(model, weights: dict, ranks: Ranks) -> None:
    """FSDP: put saved PEFT adapter weights (keys without the adapter name) into the sharded LoRA parameters."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = name.replace(".default.", ".")
            if key not in weights:
                raise UserError(f"the checkpoint's adapter has no {key}; it was saved with different lora settings")
            full[name] = weights[key]
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))


def load_optimizer(model, optimizer, state: dict, ranks: Ranks) -> None:
    if not ranks.sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, _inner(optimizer), state, options=StateDictOptions(full_state_dict=True))


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper -> the torch optimizer


# --- random state and checkpoints --------------------------------------------------------------

def gather(ranks: Ranks, value) -> Optional[list]:
    """Every rank's `value` in rank order on rank 0 (None elsewhere); [value] on one device."""
    if ranks.world == 1:
        return [value]
    import torch.distributed as dist

    out = [None] * ranks.world if ranks.is_main else None
    dist.gather_object(value, out, dst=0)
    return out


def full(tensor):
    """A plain tensor from a sharded one (a DTensor norm under FSDP2); anything else as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def checkpoint_parts(model, optimizer, ranks: Ranks, rng: dict) -> dict:
    """save_checkpoint's gathered parts (every rank calls this; rank 0 writes them)."""
    return dict(adapter_state=adapter_state(model, ranks), optimizer_state=optimizer_state(model, optimizer, ranks),
                rngs=gather(ranks, rng))


def checkpoint_loaders(model, optimizer, ranks: Ranks) -> dict:
    """load_checkpoint's loaders for a sharded model; none (the plain ones) otherwise."""
    if not ranks.sharded:
        return {}
    return dict(set_adapter=lambda weights: load_adapter(model, weights, ranks),
                set_optimizer=lambda state: load_optimizer(model, optimizer, state, ranks))


def parameter_bytes(model) -> dict:
    """Bytes of parameters this rank holds (its shards under FSDP, everything under DDP), of the model's."""
    held = whole = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        held += local.numel() * local.element_size()
        whole += p.numel() * p.element_size()
    return {"parameter_bytes": held, "model_parameter_bytes": whole}


def peak_memory_gib(device: str) -> Optional[float]:
    """Peak memory of this rank's device in GiB (CUDA), else None."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return None
