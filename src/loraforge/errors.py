"""One exception type for mistakes the user can fix: the CLI prints its message and exits 2."""


class UserError(Exception):
    """Bad input: a message naming the file, row or key and what to do. No traceback unless --debug."""

    exit_code = 2


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (library errors can run to pages), else its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# Out-of-memory as the libraries report it: Python's MemoryError, torch.OutOfMemoryError (CUDA, also
# torch.cuda.OutOfMemoryError), and RuntimeErrors from torch, bitsandbytes or accelerate whose message says so
# (accelerate.utils.memory.should_reduce_batch_size lists the same phrases).
_DEVICE_OOM = (" out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "PT_DEVMEM Allocation failed")
_HOST_OOM = ("DefaultCPUAllocator: can't allocate memory", "not enough memory: you tried to allocate")


def out_of_memory(error: BaseException) -> str | None:
    """'GPU' or 'host' when `error`, or an error it was raised from, is an out-of-memory; else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error)
        if isinstance(error, MemoryError) or any(p in text for p in _HOST_OOM):
            return "host"
        if type(error).__name__ == "OutOfMemoryError" or (
                isinstance(error, RuntimeError) and any(p in text for p in _DEVICE_OOM)):
            return "GPU"
        error = error.__cause__ or error.__context__
    return None


def allocation(error: BaseException) -> str:
    """' (it tried to allocate 2.00 GiB)' from torch's message, else ''."""
    import re

    found = re.search(r"[Tt]ried to allocate ([0-9.]+ ?[KMGT]?i?B|\d+ bytes)", str(error))
    return f" (it tried to allocate {found.group(1)})" if found else ""
