"""Habits of a fast device: TF32 and cuDNN autotuning, channels_last convolutions, pinned uploads,
an optional ``torch.compile``, synchronised clocks and the device's peak FLOP/s."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

# Dense (no sparsity) peak TFLOP/s from NVIDIA's datasheets: (fp32 on tensor cores via TF32, bf16/fp16).
# Matched by substring of torch.cuda.get_device_name(), first match wins.
GPU_PEAK_TFLOPS = (
    ("H200", 494.7, 989.4), ("H100 PCIe", 378.0, 756.0), ("H100", 494.7, 989.4), ("GH200", 494.7, 989.4),
    ("A100", 156.0, 312.0), ("L40S", 183.0, 362.0), ("L4", 60.0, 121.0), ("A10G", 35.0, 70.0),
    ("A10", 62.5, 125.0), ("V100", 15.7, 125.0), ("T4", 8.1, 65.0),
)


def configure(device: torch.device) -> None:
    """On CUDA: TF32 matmuls and convolutions (float32 training on tensor cores; the decisions that need
    full float32 run inside :func:`raysseg.core.precision.exact_fp32`) and cuDNN's autotuner (the step's
    shapes do not change)."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def prepare_model(model: torch.nn.Module, device: torch.device, backbone: str, compile_model: bool) -> None:
    """In place: channels_last for convolutional backbones on CUDA, and ``torch.compile`` of the backbone
    when asked (the module is compiled in place, so its state_dict keys do not change)."""
    if torch.device(device).type == "cuda" and not backbone.startswith("vit"):
        model.to(memory_format=torch.channels_last)
    if compile_model:
        target = getattr(model, "backbone", model)
        target.compile()


def as_input(x: torch.Tensor, backbone: str) -> torch.Tensor:
    """A float image batch in the memory format the backbone runs fastest with on its device."""
    if x.is_cuda and not backbone.startswith("vit"):
        return x.contiguous(memory_format=torch.channels_last)
    return x


class Uploader:
    """Host arrays to the device. On CUDA through a reused pinned buffer and a non-blocking copy (the
    buffer is refilled only after the previous copy out of it finished); elsewhere a plain tensor."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.done: dict[tuple, torch.cuda.Event] = {}

    def __call__(self, array: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type != "cuda":
            return host.to(self.device)
        key = (tuple(host.shape), host.dtype)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
        elif key in self.done:
            self.done[key].synchronize()
        pinned = self.buffers[key]
        pinned.copy_(host)
        out = pinned.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.done[key] = event
        return out


def clock(device) -> float:
    """``time.perf_counter()`` after the device's queued work finished (part timings on a GPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _cpu_flags() -> tuple[str, set[str], float]:
    name, flags, mhz = "", set(), 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not name:
                name = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
            elif key == "cpu MHz" and not mhz:
                mhz = float(value)
    except (OSError, ValueError):
        pass
    return name, flags, mhz


def peak_flops(device, precision: str, threads: int | None = None) -> tuple[float, str]:
    """(peak FLOP/s of ``device`` at ``precision``, how it was obtained).

    GPUs: the datasheet's dense tensor-core peak (TF32 for fp32, as :func:`configure` enables it).
    CPUs: an estimate, threads x clock x FLOPs per cycle per core from the vector units the CPU
    reports (2 FMA units: 32 fp32 FLOPs/cycle with AVX2, 64 with AVX-512; twice that for bf16 with
    AVX512_BF16; AMX tiles are not counted). ``RAYSSEG_PEAK_TFLOPS`` overrides both."""
    if os.environ.get("RAYSSEG_PEAK_TFLOPS"):
        return float(os.environ["RAYSSEG_PEAK_TFLOPS"]) * 1e12, "RAYSSEG_PEAK_TFLOPS"
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf32, half in GPU_PEAK_TFLOPS:
            if key in name:
                return (tf32 if precision == "fp32" else half) * 1e12, f"{name} datasheet, dense"
        return float("nan"), f"{name}: not in the peak table; set RAYSSEG_PEAK_TFLOPS"
    name, flags, mhz = _cpu_flags()
    per_cycle = 64 if "avx512f" in flags else 32 if "avx2" in flags else 8
    if precision != "fp32" and "avx512_bf16" in flags:
        per_cycle *= 2
    threads = threads or torch.get_num_threads()
    if not mhz:
        return float("nan"), f"{name or 'CPU'}: clock unknown; set RAYSSEG_PEAK_TFLOPS"
    return threads * mhz * 1e6 * per_cycle, f"estimate: {threads} threads x {mhz / 1000:.2f} GHz x {per_cycle} FLOP/cycle"
