"""What the benchmark tables say of where and how much they ran: the machine, and the FLOPs of a call
(``raysseg.apps.bench`` and ``raysseg.apps.bench_steps``, torch only)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def describe() -> str:
    """``N CPUs (model), M GiB, GPU name`` of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPUs ({cpu}), {mem:.0f} GiB, {gpu}"


def count_flops(fn) -> float:
    """FLOPs of ``fn()`` as ``torch.utils.flop_counter`` counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())
