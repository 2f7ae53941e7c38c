"""Hardware and library versions: recorded in summary.json at the end of training, shown in the report."""
from __future__ import annotations

import platform
import sys
from importlib import metadata

LIBRARIES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "loraforge")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_host_memory_gib() -> float | None:
    """This process's peak resident memory so far (Linux/macOS), in GiB."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def environment_info(device: str | None = None) -> dict:
    """What ran the job: Python, OS, CPU, GPUs, library versions, peak memory so far."""
    import os

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "gpus": [],
        "versions": {},
    }
    for name in LIBRARIES:
        try:
            info["versions"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info["versions"][name] = None
    try:
        import torch

        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    except Exception:  # environment details must never break a run
        pass
    host = peak_host_memory_gib()
    if host is not None:
        info["peak_host_memory_gib"] = round(host, 3)
    return info
