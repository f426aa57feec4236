"""STEGO: its config section, KNN table, datasets, input checks and benchmark timers.

The names map to the released ``src/configs/train_config.yml`` (github mhamilton723/STEGO): ``weight_self``/
``shift_self`` = pos_intra_weight/pos_intra_shift, ``weight_knn``/``shift_knn`` = pos_inter_*, ``weight_random``/
``shift_random`` = neg_inter_*, ``n_random`` = neg_samples, ``points`` = feature_samples, ``neighbours`` =
num_neighbors; the defaults are that file's active values."""
from __future__ import annotations

import functools
from dataclasses import dataclass

from raysseg.methods.base import MethodSpec, PrecomputedTable
from raysseg.settings import ConfigError, setting


@dataclass
class StegoConfig:
    weight_self: float = setting(0.67, lo=0.0, hi=100.0, help="lambda of the self pairs (pos_intra_weight)")
    weight_knn: float = setting(0.25, lo=0.0, hi=100.0, help="lambda of the KNN pairs (pos_inter_weight)")
    weight_random: float = setting(0.63, lo=0.0, hi=100.0, help="lambda of the random pairs (neg_inter_weight)")
    shift_self: float = setting(0.18, lo=-1.0, hi=2.0, help="b of the self pairs (pos_intra_shift)")
    shift_knn: float = setting(0.12, lo=-1.0, hi=2.0, help="b of the KNN pairs (pos_inter_shift)")
    shift_random: float = setting(0.46, lo=-1.0, hi=2.0, help="b of the random pairs (neg_inter_shift)")
    neighbours: int = setting(7, lo=1, hi=1000, help="K: a KNN partner is one of each image's K nearest neighbours")
    n_random: int = setting(5, lo=1, hi=100, help="random permutations of the batch per step (neg_samples)")
    points: int = setting(11, lo=1, hi=256, help="S: the loss reads S x S random points per image")
    pointwise: bool = setting(True, help="centre each row of the feature correspondence on its mean")
    zero_clamp: bool = setting(True, help="clamp the code correspondence at 0 (else no clamp)")
    dropout: float = setting(0.1, lo=0.0, hi=0.9, help="Dropout2d on the features the head and the loss see")


def _head(cfg, backbone_dim: int):
    from raysseg.methods.stego.core import StegoHead

    return StegoHead(backbone_dim, cfg.model.code_dim, cfg.stego.dropout)


def _check_config(cfg) -> None:
    if not cfg.model.frozen:
        raise ConfigError("model.frozen: STEGO trains its head on a frozen backbone; set model.frozen=true")


def _check_inputs(cfg, n_images: int) -> None:
    if cfg.stego.neighbours >= n_images:
        raise ConfigError(f"stego.neighbours: K = {cfg.stego.neighbours} nearest neighbours need more than K images "
                          f"but {cfg.data.train} has {n_images}; set stego.neighbours <= {n_images - 1}")


def knn_vectors(seg, images):
    """Each image's global descriptor for the KNN table: uint8 centre crops (B, S, S, 3) -> (B, C)."""
    import torch

    from raysseg.core.backbones import standardize
    from raysseg.methods.stego.core import pooled_features

    x = torch.from_numpy(images).to(seg.centroids.device).permute(0, 3, 1, 2).float().div_(255)
    return pooled_features(seg.backbone(standardize(x)).features)


def knn_rows(vectors, start: int, stop: int, *, columns: int):
    """Rows start:stop of the KNN table: each image's ``columns`` = K + 1 nearest (itself usually first), int32."""
    from raysseg.methods.stego.core import nearest_neighbours

    return nearest_neighbours(vectors, start, stop, columns).int().numpy()


def _tables(cfg) -> dict:
    k = cfg.stego.neighbours + 1
    return {"knn": PrecomputedTable(vectors=knn_vectors, rows=functools.partial(knn_rows, columns=k),
                                    settings={"columns": k})}


def _datasets(cfg, plan: dict) -> dict:
    """The training split centre-cropped (the released loader's crop), each row with a KNN partner: one of
    its K nearest neighbours after the first column (the image itself), drawn anew every epoch."""
    table = plan["tables"]["knn"]
    paths, rows = table["paths"], table["rows"]
    partners = {paths[i]: [paths[j] for j in rows[i, 1:]] for i in range(len(paths))}
    # "epoch": the partners of each epoch come from (train.seed, epoch) (io.images.EPOCH_SEED); a new batch order
    # every epoch, so the random pairs change too (the released loader shuffles)
    return {"train": {"train": False, "seed": "epoch", "partners": partners, "shuffle": True}}


STEGO = MethodSpec(
    name="stego", summary="STEGO: feature correspondence distilled into a head on a frozen ViT, KNN pairs",
    sections=(("stego", StegoConfig),), trainer="raysseg.methods.stego.trainer:StegoTrainer", head=_head,
    datasets=_datasets, check_config=_check_config, check_inputs=_check_inputs, tables=_tables,
    step_timers=(("backbone", "backbone fwd"), ("loss", "head + loss fwd"), ("backward", "backward+opt")),
    bench_backbone="ViT-S/16 (frozen)",
)
