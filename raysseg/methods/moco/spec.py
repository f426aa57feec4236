"""MoCo v2 pretraining (``raysseg pretrain``): its config section."""
from __future__ import annotations

from dataclasses import dataclass

from raysseg.methods.base import MethodSpec
from raysseg.settings import setting


@dataclass
class PretrainConfig:
    epochs: int = setting(50, lo=1, hi=100000)
    batch_size: int = setting(32, lo=2, hi=8192, help="images per worker per step (two crops each)")
    lr: float = setting(0.03, lo=0.0, help="SGD learning rate (momentum 0.9, cosine schedule)")
    weight_decay: float = setting(1e-4, lo=0.0)
    queue: int = setting(4096, lo=1, help="MoCo negatives queue length")
    momentum: float = setting(0.99, lo=0.0, hi=1.0, help="key encoder EMA momentum")
    temperature: float = setting(0.2, lo=1e-3, hi=10.0)
    proj_dim: int = setting(128, lo=2)
    crop_size: int = setting(0, lo=0, help="training crop side; 0 = data.image_size")
    crop_scale_min: float = setting(0.2, lo=0.01, hi=1.0)
    dense_weight: float = setting(0.0, lo=0.0, hi=1.0, help="weight of the dense term (DenseCL's 0.5; 0 = MoCo v2 "
                                                            "alone); with it a ResNet's FPN trains and is saved")
    dense_grid: int = setting(7, lo=1, hi=64, help="the dense term reads G x G points of each query view")


# Added after runs were named: a pretraining run's name hashes them only away from these defaults.
ADDED_PRETRAIN_SETTINGS = {"pretrain.dense_weight": 0.0, "pretrain.dense_grid": 7}


# Its trainer (trainer.py: MoCoTrainer) is run by raysseg.engine.loop.pretrain_worker, not train_worker.
MOCO = MethodSpec(name="moco", summary="MoCo v2 backbone pretraining (raysseg pretrain)",
                  sections=(("pretrain", PretrainConfig),))
