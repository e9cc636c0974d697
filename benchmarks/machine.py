"""What a benchmark ran on: CPU model, threads, load, versions, and the measured matmul peak.

Model FLOPs utilisation (MFU) in the benchmarks is reported against ``matmul_peak``: the best
GFLOP/s of a large square matmul measured on this machine in the same run (not a datasheet figure).
"""

from __future__ import annotations

import os
import platform
import time
from datetime import datetime, timezone

import torch


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_peak(dtype: torch.dtype, device: str = "cpu", size: int = 2048, repeat: int = 5) -> float:
    """Best GFLOP/s of a ``size`` x ``size`` matmul in ``dtype`` (2 size^3 FLOPs per product)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeat + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def describe(device: str = "cpu") -> dict:
    """Date, machine, versions, threads, load average and the fp32 / bf16 matmul peaks."""
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    info["peak_fp32_gflops"] = round(matmul_peak(torch.float32, device), 1)
    # without native bf16 a CPU emulates it about 100x slower than fp32: measure a smaller product
    slow = device == "cpu" and not info["native_bf16"]
    info["peak_bf16_gflops"] = round(matmul_peak(torch.bfloat16, device, 512 if slow else 2048, 2 if slow else 5), 1)
    return info


def header(info: dict) -> str:
    """One printable line of ``describe``'s facts."""
    return (f"# {info['date']}  {info['cpu']} ({info['cpu_capability']}, native bf16: {info['native_bf16']})  "
            f"{info['cpus']} CPUs  threads {info['threads']}  load {info['load_average']}  torch {info['torch']}  "
            f"matmul peak fp32 {info['peak_fp32_gflops']:.0f} GFLOP/s, bf16 {info['peak_bf16_gflops']:.0f} GFLOP/s")
