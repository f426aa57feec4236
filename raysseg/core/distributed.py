"""Helpers that work with or without a torch.distributed process group (one process: no-ops)."""
from __future__ import annotations

import torch


class NonFiniteLoss(RuntimeError):
    pass


def process_group():
    """torch.distributed when a process group is up, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def all_gather(obj):
    """Every rank's ``obj`` as a list (a one-element list without a process group)."""
    dist = process_group()
    if dist is None:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``t`` (same shape on every rank) in rank order along dim 0."""
    dist = process_group()
    if dist is None:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (e.g. BatchNorm statistics) on every rank."""
    dist = process_group()
    if dist is not None:
        for buf in module.buffers():
            dist.broadcast(buf, 0)


def barrier() -> None:
    dist = process_group()
    if dist is not None:
        dist.barrier()


def optimizer_step(loss: torch.Tensor, optimizer, step: int, lr_key: str, lr: float, *, weight: float = 1.0,
                   grad_clip: float = 0.0, scaler=None, clip_params: list | None = None) -> None:
    """Backward of ``loss * weight``, optional gradient clipping, one optimizer step.

    First every worker checks its loss: if any is NaN or inf, all stop together before the
    weights change, with one line naming ``lr_key`` (the setting to lower). ``scaler`` (fp16's
    GradScaler) scales the loss before backward, unscales before clipping and skips the step
    when a gradient overflowed (then lowers its scale). ``clip_params``: the parameters clipped
    (default every parameter of the optimizer)."""
    bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=loss.device)  # NCCL needs it on the GPU
    dist = process_group()
    if dist is not None:
        dist.all_reduce(bad)
    if bad.item() > 0:
        raise NonFiniteLoss(
            f"the loss became {float(loss.detach())} at step {step}; the checkpoints written so far are kept: "
            f"lower {lr_key} (now {lr}) and run again (training runs resume when train.run_name is set)"
        )
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        (loss * weight).backward()
    else:
        scaler.scale(loss * weight).backward()
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        params = clip_params if clip_params is not None else [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
