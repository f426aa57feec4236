"""Numeric precision of a run (``train.precision``): autocast for the network, fp32 for decisions.

``fp32`` runs everything in float32. ``bf16`` and ``fp16`` run the backbone, heads and losses
under :func:`torch.autocast` (``fp16`` also scales the loss with a GradScaler, so small
gradients do not flush to zero). What decides something discrete or sums many terms stays in
exact float32 whatever the precision, inside :func:`exact_fp32`: HP's positive selection and its
thresholds, cluster assignments (PiCIE labels, k-means, concept quantisation, pixel sorting),
and the masks built from them. Logsumexp and cross-entropy already run in float32 under
autocast (torch's autocast lists), on logits cast up first where the methods compute them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_exact_depth = 0  # how many exact_fp32 blocks the running code is inside
_fast_depth = 0  # how many fast_product blocks (exact_select's fast GEMMs) the running code is inside


def exact_fp32_active() -> bool:
    """Whether fp32 matmuls run now in exact fp32: inside :func:`exact_fp32` and not in one of
    :mod:`raysseg.core.exact_select`'s fast products (:func:`fast_product`; on CPU those run on fp32 tensors, bf16
    ones in oneDNN's bf16 mode). ``raysseg bench demand`` counts these FLOPs apart: a GPU runs them without
    tensor cores."""
    return _exact_depth > 0 and _fast_depth == 0 and torch.backends.mkldnn.matmul.fp32_precision == "ieee"


@contextlib.contextmanager
def fast_product():
    """Marks a block as one of exact_select's fast products (bf16 or fp16 pieces, exact products): a GPU runs it on
    tensor cores, so its FLOPs do not count as exact fp32 even where the CPU computes it in fp32."""
    global _fast_depth
    _fast_depth += 1
    try:
        yield
    finally:
        _fast_depth -= 1


@contextlib.contextmanager
def exact_fp32():
    """No autocast (CPU or CUDA) and no TF32 or bf16 fp32-matmul modes inside the block: float32 inputs give
    float32 results with full mantissas. Callers cast their inputs with ``.float()``. The TF32 switches are
    CUDA's only, so they are left alone where there is no GPU; oneDNN's fp32 mode (which
    ``torch.set_float32_matmul_precision("medium")`` can turn to bf16 on CPU) is set to IEEE."""
    mkldnn, cuda = torch.backends.mkldnn.matmul, torch.cuda.is_available()
    saved = (mkldnn.fp32_precision, cuda and torch.backends.cuda.matmul.allow_tf32,
             cuda and torch.backends.cudnn.allow_tf32)
    mkldnn.fp32_precision = "ieee"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    global _exact_depth
    _exact_depth += 1
    try:
        with torch.autocast("cpu", enabled=False), \
                (torch.autocast("cuda", enabled=False) if cuda else contextlib.nullcontext()):
            yield
    finally:
        _exact_depth -= 1
        mkldnn.fp32_precision = saved[0]
        if cuda:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1], saved[2]


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32, or as it is when already float64 (reference computations keep their precision)."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass(frozen=True)
class Precision:
    """A run's precision on one device: ``autocast()`` around forward passes and losses,
    ``scaler()`` for the optimizer step (None except for fp16)."""

    name: str = "fp32"
    device_type: str = "cpu"

    def __post_init__(self):
        if self.name not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.name!r}")

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    def autocast(self):
        """The autocast context of this precision (a no-op for fp32)."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scaler(self):
        """A fresh GradScaler for fp16; None otherwise (bf16 has fp32's exponent range)."""
        if self.name != "fp16":
            return None
        return torch.amp.GradScaler(self.device_type)


def precision_for(cfg, device) -> Precision:
    """The run's precision (``train.precision``) on ``device``."""
    return Precision(cfg.train.precision, torch.device(device).type)
