"""HP (hidden positives): its config section, datasets, input checks and benchmark timers."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raysseg.methods.base import MethodSpec
from raysseg.settings import ConfigError, setting


@dataclass
class HPConfig:
    pool_size: int = setting(2048, lo=1, help="M: one patch from each of M different images")
    renew_every: int = setting(100, lo=1, help="N: iterations between task-specific pool renewals")
    tau: float = setting(0.8, lo=1e-3, hi=10.0)
    rho: float = setting(0.02, lo=0.0, hi=1.0, help="fraction of non-positives kept as negatives")
    alpha: float = setting(0.05, lo=0.0, hi=100.0, help="consistency regulariser weight")
    warmup: int = setting(1000, lo=0, help="iterations with lambda = 0")
    ema: float = setting(0.99, lo=0.0, hi=1.0, help="EMA momentum of the task-specific head")
    sigma: float = setting(28.0, lo=0.0, help="attention scale in local hidden positives")
    local: bool = setting(True, help="local hidden positives (gradient propagation)")
    chunk: int = setting(2048, lo=16, help="anchor rows per block in selection and loss")
    loss_form: str = setting("paper", choices=("paper", "released"),
                             help="paper: the paper's text; released: how the authors' released code combines the "
                                  "terms (per-image halved loss, weights normalised per image, shared negatives, "
                                  "a dropout sample per use, selection on dropped-out features, pools from new random "
                                  "patches, (t-w)/(T-w) ramp, per-epoch Q_sp renewal, projection head without weight "
                                  "decay or clipping, EMA from the pre-step weights); see methods/hp/core.py")
    selection: str = setting("fp32", choices=("fp32", "bf16_recheck", "bf16x3_recheck", "fp16_recheck"),
                             help="fp32: the selection's products in exact fp32; bf16_recheck: in bf16 with an fp32 "
                                  "re-check of the pairs within the proven error bound of their threshold (the same "
                                  "positives bit for bit; raysseg/core/exact_select.py); bf16x3_recheck: three bf16 "
                                  "passes, a ~45x narrower margin; fp16_recheck: one fp16 pass, ~8x narrower (for "
                                  "GPUs' tensor cores; on CPU its fast products run at fp32's speed)")


def _head(cfg, backbone_dim: int):
    from raysseg.methods.hp.core import HPModel

    head = HPModel(backbone_dim, cfg.model.code_dim)
    head.code_dim = cfg.model.code_dim
    head.selection = cfg.hp.selection
    return head


def _check_config(cfg) -> None:
    if not cfg.model.backbone.startswith("vit"):
        raise ConfigError(f"model.backbone: HP needs a ViT backbone (last-block attention), got {cfg.model.backbone}")
    if not cfg.model.frozen:
        raise ConfigError("model.frozen: HP trains heads on a frozen backbone; set model.frozen=true")


def _check_inputs(cfg, n_images: int) -> None:
    if cfg.hp.pool_size > n_images:
        raise ConfigError(
            f"hp.pool_size: M = {cfg.hp.pool_size} needs one patch from each of M different images but "
            f"{cfg.data.train} has {n_images}; set hp.pool_size <= {n_images}"
        )


def _plan(cfg, files: list[str], grid: int) -> dict:
    """The pool: M images drawn across the whole split, one random patch each: path -> (index, patch)."""
    rng = np.random.default_rng(cfg.train.seed)
    chosen = rng.choice(len(files), cfg.hp.pool_size, replace=False)
    patches = rng.integers(0, grid, cfg.hp.pool_size)
    return {"pool": {files[i]: (k, int(p)) for k, (i, p) in enumerate(zip(chosen, patches))}}


def _datasets(cfg, plan: dict) -> dict:
    # "epoch": new crops every epoch, from (train.seed, epoch): a resumed run draws the same ones (io.images.EPOCH_SEED)
    return {"train": {"train": True, "crop_scale": (cfg.data.crop_scale_min, 1.0), "seed": "epoch"},
            "pool": {"train": False, "files": sorted(plan["pool"])}}


HP = MethodSpec(
    name="hp", summary="hidden positives: heads on a frozen ViT, task-agnostic and task-specific pools",
    sections=(("hp", HPConfig),), trainer="raysseg.methods.hp.trainer:HPTrainer", head=_head,
    datasets=_datasets, plan=_plan, check_config=_check_config, check_inputs=_check_inputs,
    step_timers=(("backbone", "backbone fwd"), ("selection", "selection"), ("loss", "contrastive loss"),
                 ("head_forward", "all head fwd"), ("backward", "backward+opt"), ("bank", "bank")),
    once_timers=(("pool_build", "pool build s (once)"),), bench_backbone="ViT-S/16 (frozen)",
)
