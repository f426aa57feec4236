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
    return count_flops_split(fn)[0]


def count_flops_split(fn) -> tuple[float, float]:
    """(all FLOPs of ``fn()``, those of them in exact fp32): an op counts as exact when it runs on float32 or
    float64 operands while :func:`raysseg.core.precision.exact_fp32_active` (a GPU runs those on its
    fp32 units, not its tensor cores). Counted with ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    from raysseg.core.precision import exact_fp32_active

    class _SplitCounter(FlopCounterMode):
        exact = 0

        def _count_flops(self, func_packet, out, args, kwargs):
            before = self.get_total_flops()
            out = super()._count_flops(func_packet, out, args, kwargs)
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if exact_fp32_active() and first is not None and first.dtype in (torch.float32, torch.float64):
                self.exact += self.get_total_flops() - before
            return out

    counter = _SplitCounter(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops()), float(counter.exact)
