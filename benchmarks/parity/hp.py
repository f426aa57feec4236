"""HP parity: the released code (github hynnsk/HP) and ``hp.loss_form: released`` on the same inputs.

    python benchmarks/parity/hp.py /path/to/HP [--out tests/fixtures/parity/hp_released.npz] [--no-timing]

Imports the released ``run.py``, ``loss.py``, ``make_reference_pool.py`` and ``model/dino/DinoFeaturizer.py`` at
run time (nothing of them is copied here) and runs the released training loop itself, ``run.run``, for
EPOCHS x BATCHES iterations on small random images with a random ViT-S/16 (its own ``vision_transformer``), on
the CPU. Its data, model builders, STEGO probes/criterion, evaluation and checkpointing are replaced by small
stand-ins (the probes are trained on detached codes and do not touch HP's heads), ``.cuda()`` is the identity,
and these are recorded on the way: every Dropout2d mask (drawn here from one generator, one [B, C] sample per
call), the ViT outputs (rounded to fp16-exact values so the golden file can hold them in fp16), the pools and their
random patches, the random negative mask (the global torch state before each ``SupConLoss`` call), the positive
masks (``loss.py``'s ``torch.logical_or`` results), lambda, the head gradients before clipping, and the weights
after each step. The project side runs the same iterations through ``HPTrainer.step_on`` (the trainer's own
schedule, loss, parameter groups, clipping, optimiser and EMA) with the recorded ViT outputs, masks, pools and
negative draws fed in, twice: re-synced (before each step our heads, EMA head and Adam state are set to the
released ones after the previous step, so each step is compared from the same state) and free-running. Then prints
the parity table (quantity, max abs diff, max rel diff = max abs diff over the largest magnitude of the released
quantity) and writes the first step's inputs and the released outputs, at lambda = 0 and 0.25, to ``--out``
(``tests/test_parity_hp.py``).

Rows that are not within 1e-5 relative, and why (nothing of the method):
- lambda 0.3: the released positive weights are fp16 (loss.py:247 ``weighted_mask`` from the fp16 masks of
  loss.py:209-229; 0.3 becomes 0.29980); the project's are fp32 (raysseg/methods/hp/core.py,
  ``_released_image_sum``). lambda 0 and 0.25 are exact in fp16 and agree to ~1e-7.
- head weights after the step (all entries): torch's Adam divides each gradient entry by its own magnitude
  (+ eps 1e-8), so entries of ~1e-8 (a millionth of the largest) carry the gradients' float noise (~1e-7
  relative, different summation orders) into the update at the learning-rate scale; the row restricted to
  entries with |grad| >= 1e-6 max is within 1e-5 (same optimiser call on both sides: run.py:226/230 and
  raysseg/core/distributed.py ``optimizer_step``).
- Q_ag / Q_sp rows: the released pools are normalised and stored in fp16 (make_reference_pool.py:233-234,
  265-266, 291); ours are fp32 (raysseg/methods/hp/trainer.py ``setup`` / ``_refresh_sp``). Both losses get the
  fp16 rows renormalised in fp32 (:func:`unit`).

Timing (unless ``--no-timing``): the same loop again with the released ViT, against ``HPTrainer.step_on`` with
the project's timm ViT loaded from the same weights; both get the image and its augmented copy from outside
(no augmentation on either side), one thread (``--threads``), CPU-seconds per iteration; ``--timing-rounds`` (3)
rounds in turn, each cell the median over rounds.

The released modules import packages unrelated to this (wandb, pytorch_lightning, torchmetrics): empty stand-in
modules in ``sys.modules``, in this process only. Runs in the project's venv.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from raysseg.config import load_config  # noqa: E402
from raysseg.core.backbones import BackboneOutput, standardize  # noqa: E402
from raysseg.methods.base import TrainContext  # noqa: E402
from raysseg.methods.hp.core import HPModel, hidden_positive_mask  # noqa: E402
from raysseg.methods.hp.spec import HPConfig  # noqa: E402
from raysseg.methods.hp.trainer import HPTrainer  # noqa: E402
from raysseg.methods.registry import build_segmenter  # noqa: E402
from raysseg.methods.shared import LocalSharedState  # noqa: E402

B, S, PATCH, K, C = 2, 64, 16, 16, 384  # images per batch, pixels, ViT patch, code dims, ViT-S dims
G = S // PATCH  # feature grid side
BATCHES, EPOCHS, POOL, RENEW, WARMUP = 3, 2, 4, 2, 2  # lambda: 0, 0, 0, 1/4, 1/2, 3/4; Q_sp renewed at i = 2
TAU, RHO, ALPHA, EMA, LR, WD, CLIP = 0.8, 0.2, 0.05, 0.99, 5e-4, 0.1, 10.0
EXTRA_LAMBDAS = (0.25, 0.3)  # evaluated on the first step's tensors too (0.3 shows the released fp16 weights)
SEED = 0


# ----------------------------------------------------------------------------- released code, instrumented

def _stub(name: str, **attrs) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module


class _Proxy:
    """A module seen through a few replaced attributes (the rest forwarded)."""

    def __init__(self, module, **replaced):
        self._module, self._replaced = module, replaced

    def __getattr__(self, name):
        return self._replaced[name] if name in self._replaced else getattr(self._module, name)


def import_released(repo: Path):
    _stub("wandb", finish=lambda: None)
    _stub("pytorch_lightning")
    _stub("pytorch_lightning.utilities")
    _stub("pytorch_lightning.utilities.seed", seed_everything=lambda seed: None)
    _stub("torchmetrics", Metric=nn.Module)
    torch.Tensor.cuda = lambda self, *a, **k: self  # CPU only: .cuda() is the identity in this process
    nn.Module.cuda = lambda self, *a, **k: self
    sys.path.insert(0, str(repo))
    import loss as released_loss
    import make_reference_pool
    import run as released_run
    from model.dino import vision_transformer as vits
    from model.dino.DinoFeaturizer import DinoFeaturizer

    return types.SimpleNamespace(run=released_run, loss=released_loss, pool=make_reference_pool, vits=vits,
                                 DinoFeaturizer=DinoFeaturizer)


def released_opt(weights: str, warmup: int = WARMUP) -> dict:
    return {
        "output_dir": tempfile.mkdtemp(), "dataset": {"data_type": "random"}, "wandb": {"name": "parity"},
        "dataloader": {"batch_size": B}, "tau": TAU, "alpha": ALPHA, "rho": RHO, "loss_version": 1,
        "reweighting": 1, "renew_interval": RENEW,
        "model": {"pool_size": POOL, "ema_m": EMA, "warmup": warmup, "spatial_size": G, "name": "STEGO", "dim": K,
                  "pretrained": {"model_type": "vit_small", "dino_patch_size": PATCH, "dino_feat_type": "feat",
                                 "pretrained_weights": weights, "projection_type": "nonlinear", "dropout": True}},
        "spatial_size": G, "ema_m": EMA, "loss": {},
        "optimizer": {"net": {"name": "adamw", "lr": LR, "weight_decay": WD}, "linear": {"name": "adam", "lr": 1e-3},
                      "cluster": {"name": "adam", "lr": 5e-3}},
        "train": {"print_freq": 1000, "valid_freq": 1000, "epoch": EPOCHS, "freeze_encoder_bn": False,
                  "freeze_all_bn": -1, "grad_norm": CLIP},
        "eval": {"is_direct": False, "extra_clusters": 0, "is_crf": False},
    }


def quantize_heads(net) -> None:
    """Head weights rounded to multiples of 2^-11 (int8 in the golden file); the EMA heads copy them, as at init."""
    with torch.no_grad():
        for head, ema in ((net.cluster1, net.ema_model1), (net.cluster2, net.ema_model2)):
            for p, q in zip(head.parameters(), ema.parameters()):
                p.copy_(torch.round(p * 2048).clamp(-127, 127) / 2048)
                q.copy_(p)


class RecordingDropout(nn.Module):
    """Dropout2d(0.1) drawing from its own generator; every mask [B, C] goes to ``log``."""

    def __init__(self, log: list, seed: int):
        super().__init__()
        self.log, self.generator = log, torch.Generator().manual_seed(seed)

    def forward(self, x):
        keep = torch.rand(x.shape[:2], generator=self.generator) >= 0.1
        self.log[-1]["masks"].append(keep)
        return x * (keep.float() / 0.9)[:, :, None, None]


def unit(pool: torch.Tensor) -> torch.Tensor:
    """The released pools are normalised and stored in fp16 (make_reference_pool.py:233-234, 265-266, 291), so
    their rows have norms 1 +- 5e-4 and the released loss uses them as they are, while the project normalises the
    pool in fp32 itself (core.py, the selection): both sides get the fp16 rows renormalised in fp32 (fp32 also for
    the CPU matmuls); the ``Q_* rows`` rows of the table compare the pools as stored."""
    return F.normalize(pool.float(), dim=1)


class _Done(Exception):
    pass


class Recorder:
    """Runs ``run.run`` once and keeps what it computed, step by step."""

    def __init__(self, rel, weights: str, images: dict, round_features: bool):
        self.rel, self.images, self.round = rel, images, round_features
        self.forwards: list[dict] = []  # one per featurizer call: train flag, masks, ViT outputs
        self.steps: list[dict] = []
        self.pools: list[dict] = []  # (step, Pool_ag, Pool_sp, patches)
        self.randints: list[int] = []
        self.ors: list[torch.Tensor] = []
        self.times: list[float] = []  # process time at each batch's start and at each evaluation (the end of an epoch)
        self.evaluations: set[int] = set()  # indices into times that are evaluations
        self.opt = released_opt(weights)
        torch.manual_seed(SEED)
        self.net = rel.DinoFeaturizer(K, self.opt["model"])
        quantize_heads(self.net)
        self.init_state = copy.deepcopy(self.net.state_dict())
        self.phase = "pool"
        self.net.dropout = RecordingDropout(self.forwards, SEED + 1)
        self._instrument()

    # -- stand-ins for what run.run builds
    def _instrument(self) -> None:
        rec, rel, net = self, self.rel, self.net
        vit_feat = net.model.get_intermediate_feat

        def intermediate(img, n=1):
            feat, attn, qkv = vit_feat(img, n=n)
            if rec.round:  # fp16-exact inputs (both sides see the same values)
                feat, attn = [f.half().float() for f in feat], [a.half().float() for a in attn]
            rec.forwards[-1].update(feat=feat[0].detach().clone(), attn=attn[0].detach().clone())
            return feat, attn, qkv

        net.model.get_intermediate_feat = intermediate
        forward = net.forward

        def tagged(img, n=1, return_class_feat=False, train=False):
            rec.forwards.append({"train": train, "masks": [], "step": len(rec.steps), "phase": rec.phase})
            return forward(img, n=n, return_class_feat=return_class_feat, train=train)

        net.forward = tagged

        class Criterion(nn.Module):  # STEGO's probes: not HP's heads (trained on detached codes)
            def forward(self, model_input, model_output, linear_output=None, cluster_output=None):
                return torch.zeros(()), {"loss": 0.0}, {}

        class Probe(nn.Module):
            def __init__(self):
                super().__init__()
                self.w = nn.Parameter(torch.zeros(1))

            def forward(self, code, *a, **k):
                return (self.w.sum() * 0, code) if a or k else code

        class Loader(list):
            def __iter__(self):
                for item in list.__iter__(self):
                    rec.times.append(time.process_time())
                    rec.phase = "step"
                    yield item

        loaders = iter([list(self.images["memory"]), Loader(self.images["train"]), []])

        class HeadAdam(torch.optim.Adam):  # the projection head's optimiser: keep its parameters
            def __init__(self, params, lr):
                params = list(params)
                rec.head_params, rec.head_init = params, [p.detach().clone() for p in params]
                super().__init__(params, lr=lr)
                for name, p in zip(("proj.weight", "proj.bias"), params):
                    p.register_post_accumulate_grad_hook(rec._grad_hook(name))

            def step(self, closure=None):
                rec.head_optimizer = self
                out = super().step(closure)
                rec._after_step()
                return out

        def evaluate(*a, **k):
            rec.evaluations.add(len(rec.times))
            rec.times.append(time.process_time())
            if len(rec.steps) == BATCHES * EPOCHS:
                raise _Done
            return 0.0, {"Cluster_mIoU": 0, "Cluster_Accuracy": 0, "Linear_mIoU": 0, "Linear_Accuracy": 0}

        def init_pool(net_model, loader, opt, feat_dim, device):
            rec.phase, first = "pool", len(rec.randints)
            ag, sp = rel.pool.initialize_reference_pool(net_model, loader, opt, feat_dim, device)
            rec.pools.append({"step": 0, "ag": unit(ag), "sp": unit(sp), "ag16": ag.float(), "sp16": sp.float(),
                              "patches": rec.randints[first:]})
            return rec.pools[-1]["ag"], rec.pools[-1]["sp"]

        def renew_pool(net_model, loader, opt, device):
            rec.phase, first = "pool", len(rec.randints)
            sp = rel.pool.renew_reference_pool(net_model, loader, opt, device)
            rec.phase = "step"
            rec.pools.append({"step": len(rec.steps), "sp": unit(sp), "sp16": sp.float(),
                              "patches": rec.randints[first:]})
            return rec.pools[-1]["sp"]

        class Randint:
            @staticmethod
            def randint(lo, hi):
                value = np.random.randint(lo, hi)
                rec.randints.append(value)
                return value

        rel.pool.np = types.SimpleNamespace(random=Randint)
        rel.loss.torch = _Proxy(torch, logical_or=lambda a, b: rec.ors.append(torch.logical_or(a, b)) or rec.ors[-1])

        class PairwiseDistance(nn.PairwiseDistance):
            def forward(self, x1, x2):
                rec.reg = super().forward(x1, x2)
                return rec.reg

        class SupCon(rel.loss.SupConLoss):
            def forward(self, z, modeloutput_s_pr=None, modeloutput_f=None, Pool_ag=None, Pool_sp=None, opt=None,
                        lmbd=None, modeloutput_z_mix=None):
                return rec._supcon(super().forward, z, modeloutput_s_pr, modeloutput_f, Pool_ag, Pool_sp, opt, lmbd,
                                   modeloutput_z_mix)

        for name, p in net.named_parameters():
            if name.startswith("cluster"):
                p.register_post_accumulate_grad_hook(self._grad_hook(name))
        run = rel.run
        run.torch = _Proxy(torch, device=lambda *a: torch.device("cpu"))
        run.nn = _Proxy(nn, PairwiseDistance=PairwiseDistance)
        run.Adam = HeadAdam
        run.SupConLoss = SupCon
        run.set_wandb = lambda *a, **k: self.opt["output_dir"]
        run.build_dataset = lambda *a, **k: types.SimpleNamespace(n_classes=3)
        run.build_dataloader = lambda *a, **k: next(loaders)
        run.build_model = lambda **k: (net, Probe(), Probe())
        build_optimizer = run.build_optimizer

        def optimizers(**k):
            out = build_optimizer(**k)
            rec.net_optimizer = out[0]
            return out

        run.build_optimizer = optimizers
        run.build_criterion = lambda **k: Criterion()
        run.evaluate = evaluate
        run.save_checkpoint = lambda *a, **k: None
        run.initialize_reference_pool = init_pool
        run.renew_reference_pool = renew_pool

    def _grad_hook(self, name):
        def hook(p):
            self.steps[-1]["grads"][name] = p.grad.detach().clone()
        return hook

    def _supcon(self, call, z, s_pr, f, pool_ag, pool_sp, opt, lam, z_mix):
        step = {"lam": lam, "grads": {}, "rng": torch.get_rng_state(), "reg": float(self.reg.mean())}
        self.steps.append(step)
        first = len(self.steps) == 1

        def released(lmbd, anchors, mixed):
            torch.set_rng_state(step["rng"])
            del self.ors[:]
            return call(anchors, modeloutput_s_pr=s_pr, modeloutput_f=f, Pool_ag=pool_ag, Pool_sp=pool_sp, opt=opt,
                        lmbd=lmbd, modeloutput_z_mix=mixed)

        params = [p for n, p in self.net.named_parameters() if n.startswith("cluster")] + self.head_params
        names = [n for n, _ in self.net.named_parameters() if n.startswith("cluster")] + ["proj.weight", "proj.bias"]
        step["at"] = {}
        for lmbd in (lam, *EXTRA_LAMBDAS) if first else (lam,):
            # GHP alone: z as its own mixed codes ((GHP + GHP) / 2); LHP alone: z_mix on both sides
            parts = {"ghp": float(released(lmbd, z, z)), "lhp": float(released(lmbd, z_mix, z_mix))}
            total = released(lmbd, z, z_mix) + self.reg.mean() * opt["alpha"]
            parts.update(total=float(total), reg=step["reg"])
            diagonal = torch.eye(G * G, B * G * G, dtype=torch.bool)
            rows = [torch.cat([self.ors[3 * i + k] for i in range(B)]).bool() for k in range(3)]
            eye = torch.cat([diagonal.roll(i * G * G, dims=1) for i in range(B)])
            parts.update(pos_ag=rows[0] & ~eye, denominator=rows[1] & ~eye, pos_sp=rows[2] & ~eye)
            if first:
                grads = torch.autograd.grad(total, params, retain_graph=True)
                parts["grads"] = {n: g.detach().clone() for n, g in zip(names, grads)}
            step["at"][float(lmbd)] = parts
        torch.set_rng_state(step["rng"])
        step["neg"] = torch.FloatTensor(G * G, B * G * G).uniform_() < opt["rho"]
        torch.set_rng_state(step["rng"])
        del self.ors[:]
        return call(z, modeloutput_s_pr=s_pr, modeloutput_f=f, Pool_ag=pool_ag, Pool_sp=pool_sp, opt=opt,
                    lmbd=lam, modeloutput_z_mix=z_mix)

    def _after_step(self) -> None:
        named = [(n, p) for n, p in self.net.named_parameters() if n.startswith(("cluster", "ema"))]
        named += list(zip(("proj.weight", "proj.bias"), self.head_params))
        self.steps[-1]["after"] = {n: p.detach().clone() for n, p in named}
        states = {**self.net_optimizer.state, **self.head_optimizer.state}
        self.steps[-1]["adam"] = {n: {k: v.clone() for k, v in states[p].items()} for n, p in named if p in states}

    def run(self) -> None:
        np.random.seed(SEED)
        torch.manual_seed(SEED)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # run.py's progress prints
                self.rel.run.run(self.opt)
        except _Done:
            pass


# ----------------------------------------------------------------------------- the project's side

OURS_ORDER = (0, 2, 1, 3, 5, 4, 6)  # ours: head lin, head nonlin, EMA lin, EMA nonlin, EMA codes, feats, mixed
# (the released forward draws: head lin, EMA lin, head nonlin, EMA nonlin, feats, EMA codes, mixed codes)


class ReplayDropout(nn.Module):
    """Dropout2d(0.1) with given keep masks [B, C], in call order."""

    def __init__(self):
        super().__init__()
        self.queue: list[torch.Tensor] = []

    def forward(self, x):
        keep = self.queue.pop(0)
        return x * (keep.float() / 0.9)[:, :, None, None]


class ReplayBackbone(nn.Module):
    """Stands for the frozen ViT: returns the released ViT's recorded outputs, in call order."""

    def __init__(self):
        super().__init__()
        self.queue: list[BackboneOutput] = []

    def forward(self, x, with_attention: bool = False):
        return self.queue.pop(0)


def features(forward: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The released ViT outputs of one featurizer call as our backbone gives them: [B, C, G, G], [B, n, n]."""
    feat, attn = forward["feat"], forward["attn"]
    return (feat[:, 1:].reshape(feat.shape[0], G, G, -1).permute(0, 3, 1, 2).contiguous(),
            attn[:, :, 1:, 1:].mean(dim=1))


def step_masks(train: dict, aug: dict) -> list[torch.Tensor]:
    """The nine masks of one released iteration, in the order ``HPModel.released_loss`` draws them."""
    return [train["masks"][i] for i in OURS_ORDER] + [aug["masks"][0], aug["masks"][2]]


def project_config(weights: str = "", *overrides: str):
    return load_config("hp_cocostuff_released", [
        "model.backbone=vit_small_patch16", f"model.weights={weights}", f"model.code_dim={K}", f"data.image_size={S}",
        f"train.batch_size={B}", f"train.epochs={EPOCHS}", f"train.lr={LR}", f"train.weight_decay={WD}",
        f"train.grad_clip={CLIP}", "train.use_gpu=false", f"hp.pool_size={POOL}", f"hp.renew_every={RENEW}",
        f"hp.warmup={WARMUP}", f"hp.tau={TAU}", f"hp.rho={RHO}", f"hp.alpha={ALPHA}", f"hp.ema={EMA}", "hp.sigma=28.0",
        "hp.chunk=16", *overrides])


def load_head(head: HPModel, state: dict, proj: list[torch.Tensor]) -> None:
    """The released featurizer's heads (cluster1/2, ema_model1/2) and projection head into ours."""
    pairs = {"seg.linear": "cluster1.0", "seg.nonlinear.0": "cluster2.0", "seg.nonlinear.2": "cluster2.2",
             "ema_seg.linear": "ema_model1.0", "ema_seg.nonlinear.0": "ema_model2.0",
             "ema_seg.nonlinear.2": "ema_model2.2"}
    with torch.no_grad():
        for ours, theirs in pairs.items():
            for kind in ("weight", "bias"):
                head.get_submodule(ours).get_parameter(kind).copy_(state[f"{theirs}.{kind}"])
        head.proj.linear.weight.copy_(proj[0])
        head.proj.linear.bias.copy_(proj[1])


OUR_NAMES = {"seg.linear.weight": "cluster1.0.weight", "seg.linear.bias": "cluster1.0.bias",
             "seg.nonlinear.0.weight": "cluster2.0.weight", "seg.nonlinear.0.bias": "cluster2.0.bias",
             "seg.nonlinear.2.weight": "cluster2.2.weight", "seg.nonlinear.2.bias": "cluster2.2.bias",
             "ema_seg.linear.weight": "ema_model1.0.weight", "ema_seg.linear.bias": "ema_model1.0.bias",
             "ema_seg.nonlinear.0.weight": "ema_model2.0.weight", "ema_seg.nonlinear.0.bias": "ema_model2.0.bias",
             "ema_seg.nonlinear.2.weight": "ema_model2.2.weight", "ema_seg.nonlinear.2.bias": "ema_model2.2.bias",
             "proj.linear.weight": "proj.weight", "proj.linear.bias": "proj.bias"}


def our_selection(head: HPModel, feat: torch.Tensor, masks: list[torch.Tensor], q_ag, q_sp):
    """Our positive masks for one iteration's inputs (the selection inside ``released_loss``, from its parts)."""
    keep = [(m.float() / 0.9)[:, :, None, None] for m in masks]
    flat = lambda x: F.normalize(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), dim=1)  # noqa: E731
    with torch.no_grad():
        s_ema = (head.ema_seg.linear(feat * keep[2]) + head.ema_seg.nonlinear(feat * keep[3])) * keep[4]
        return (hidden_positive_mask(flat(feat * keep[5]), F.normalize(q_ag, dim=1), 16),
                hidden_positive_mask(flat(s_ema), F.normalize(q_sp, dim=1), 16))


def run_ours(rec: Recorder, resync: bool) -> list[dict]:
    """The same iterations through ``HPTrainer.step_on`` with the released run's inputs and draws fed in.
    ``resync``: before each step, our heads, EMA head and Adam state are set to the released ones after the
    previous step, so each step is compared from the same state (float noise does not accumulate)."""
    cfg = project_config()
    torch.manual_seed(SEED)
    seg = build_segmenter(cfg)
    seg.backbone = ReplayBackbone()
    load_head(seg.head, rec.init_state, rec.head_init)
    seg.head.dropout = ReplayDropout()
    shared = LocalSharedState()
    trainer = HPTrainer(cfg, seg, TrainContext(rank=0, world=1, device=torch.device("cpu"), shared=shared,
                                               total_steps=BATCHES * EPOCHS, plan={"pool": {}}))
    trainer.q_ag = rec.pools[0]["ag"]
    grads: dict[str, torch.Tensor] = {}
    for name, p in seg.head.named_parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p, name=name: grads.__setitem__(name, p.grad.detach().clone()))
    out = []
    published = 0
    for t, theirs in enumerate(rec.steps):
        while published < len(rec.pools) and rec.pools[published]["step"] <= t:
            published += 1
            shared.put_part("sp", published, 0, np.arange(POOL), rec.pools[published - 1]["sp"].numpy())
        train, aug = [f for f in rec.forwards if f["step"] == t and f["phase"] == "step"]
        feat, attn = features(train)
        seg.backbone.queue = [BackboneOutput(feat, attn), BackboneOutput(features(aug)[0])]
        masks = step_masks(train, aug)
        seg.head.dropout.queue = list(masks)
        trainer.generator.set_state(theirs["rng"])
        if resync and t > 0:
            before = rec.steps[t - 1]
            params = {OUR_NAMES[n]: p for n, p in seg.head.named_parameters()}
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(before["after"][name])
            for name, state in before["adam"].items():
                trainer.optimizer.state[params[name]] = {k: v.clone() for k, v in state.items()}
        q_sp = rec.pools[published - 1]["sp"]
        pos_ag, pos_sp = our_selection(seg.head, feat, masks, trainer.q_ag, q_sp)
        neg = torch.rand((G * G, B * G * G), generator=torch.Generator().set_state(theirs["rng"])) < RHO
        grads.clear()
        stats = trainer.step_on(torch.zeros(B, 3, S, S), torch.zeros(B, 3, S, S), t)
        weights = {OUR_NAMES[n]: p.detach().clone() for n, p in seg.head.named_parameters()}
        out.append({"stats": stats, "grads": {OUR_NAMES[n]: g for n, g in grads.items()}, "after": weights,
                    "pos_ag": pos_ag, "pos_sp": pos_sp, "neg": neg})
    return out


def ours_first_step(rec: Recorder, lam: float) -> dict:
    """``HPModel.loss`` (released) on the first iteration's inputs at ``lam``, with gradients."""
    head = HPModel(C, K)
    load_head(head, rec.init_state, rec.head_init)
    head.dropout = ReplayDropout()
    train, aug = [f for f in rec.forwards if f["step"] == 0 and f["phase"] == "step"]
    feat, attn = features(train)
    head.dropout.queue = step_masks(train, aug)
    generator = torch.Generator().set_state(rec.steps[0]["rng"])
    loss, stats = head.loss(feat, features(aug)[0], attn, rec.pools[0]["ag"], rec.pools[0]["sp"], lam, tau=TAU,
                            rho=RHO, alpha=ALPHA, sigma=28.0, chunk=16, generator=generator, loss_form="released")
    params = {OUR_NAMES[n]: p for n, p in head.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(params.values()))
    return {"stats": stats, "grads": dict(zip(params, grads))}


# ----------------------------------------------------------------------------- comparison, golden file, timing

def diff(ours, theirs) -> tuple[float, float]:
    """(max |ours - theirs|, that over max |theirs|): the relative error is normwise, so near-zero entries of a
    gradient do not dominate it."""
    a = torch.as_tensor(ours, dtype=torch.float64)
    b = torch.as_tensor(theirs, dtype=torch.float64)
    d = float((a - b).abs().max()) if a.numel() else 0.0
    scale = float(b.abs().max()) if b.numel() else 0.0
    return d, d / scale if scale > 0 else d


def mismatches(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    """(entries that differ, that over the entries set in theirs) of two bool masks."""
    n = int((ours != theirs).sum())
    return float(n), n / max(int(theirs.sum()), 1)


def table(rows: list[tuple[str, tuple[float, float]]]) -> str:
    width = max(len(name) for name, _ in rows)
    lines = [f"{'quantity':<{width}}  {'max abs diff':>12}  {'max rel diff':>12}"]
    lines += [f"{name:<{width}}  {a:>12.3g}  {r:>12.3g}" for name, (a, r) in rows]
    return "\n".join(lines)


def parity_rows(rec: Recorder, ours: list[dict], free: list[dict]) -> list[tuple[str, tuple[float, float]]]:
    """ours: re-synced steps; free: free-running steps (both from :func:`run_ours`)."""
    rows = []
    first = rec.steps[0]
    for lam in (0.0, *EXTRA_LAMBDAS):
        o, t = ours_first_step(rec, lam), first["at"][lam]
        for key, name in (("ghp", "loss_ghp"), ("lhp", "loss_lhp"), ("reg", "loss_consistency"),
                          ("total", "loss_total")):
            rows.append((f"step 0, lambda {lam}: {key}", diff(o["stats"][name], t[key])))
        rows.append((f"step 0, lambda {lam}: head gradients (all)",
                     max((diff(o["grads"][n], g) for n, g in t["grads"].items()), key=lambda x: x[1])))
    steps = range(len(rec.steps))
    lam_t = [rec.steps[s]["lam"] for s in steps]
    last = len(rec.steps) - 1
    rows.append(("lambda ramp, every step", diff([o["stats"]["lam"] for o in ours], lam_t)))
    renewals = [1 + sum(p["step"] <= s for p in rec.pools[1:]) for s in steps]
    rows.append(("Q_sp version, every step", diff([o["stats"]["sp_version"] for o in ours], renewals)))
    for key, name in (("ghp", "loss_ghp"), ("lhp", "loss_lhp"), ("reg", "loss_consistency"), ("total", "loss_total")):
        rows.append((f"steps 0-{last}: {key}",
                     max((diff(ours[s]["stats"][name], rec.steps[s]["at"][lam_t[s]][key]) for s in steps),
                         key=lambda x: x[1])))
    rows.append((f"steps 0-{last}: head gradients",
                 max((diff(ours[s]["grads"][n], g) for s in steps for n, g in rec.steps[s]["grads"].items()),
                     key=lambda x: x[1])))

    def after(prefix, s, significant):
        out = []
        for n, w in rec.steps[s]["after"].items():
            if n.startswith(prefix):
                g = rec.steps[s]["grads"].get(n.replace("ema_model", "cluster"))
                keep = torch.ones_like(w, dtype=torch.bool)
                if significant and g is not None:  # Adam's g / (|g| + eps) magnifies the float noise of tiny entries
                    keep = g.abs() >= 1e-6 * g.abs().max()
                out.append(diff(ours[s]["after"][n][keep], w[keep]))
        return max(out, key=lambda x: x[1])

    for prefix, label in (("cluster", "head weights"), ("ema", "EMA head weights"), ("proj", "projection weights")):
        rows.append((f"steps 0-{last}: {label} after the step", max((after(prefix, s, False) for s in steps),
                                                                   key=lambda x: x[1])))
    rows.append((f"steps 0-{last}: head weights after, |grad| >= 1e-6 max",
                 max((after("cluster", s, True) for s in steps), key=lambda x: x[1])))
    for key in ("pos_ag", "pos_sp"):
        rows.append((f"steps 0-{last}: {key} (entries differing)",
                     max((mismatches(ours[s][key], rec.steps[s]["at"][lam_t[s]][key]) for s in steps))))
    denominators = [(ours[s]["pos_ag"] | torch.cat([ours[s]["neg"]] * B)) & ~torch.eye(B * G * G, dtype=torch.bool)
                    for s in steps]
    rows.append((f"steps 0-{last}: denominator sets (entries differing)",
                 max(mismatches(denominators[s], rec.steps[s]["at"][lam_t[s]]["denominator"]) for s in steps)))
    rows.append((f"steps 0-{last}: random negative draw (entries differing)",
                 max(mismatches(ours[s]["neg"], rec.steps[s]["neg"]) for s in steps)))
    for s in steps:
        rows.append((f"free-running step {s} (lambda {lam_t[s]}): total",
                     diff(free[s]["stats"]["loss_total"], rec.steps[s]["at"][lam_t[s]]["total"])))
    rows.append((f"free-running step {last}: EMA head weights",
                 max((diff(free[last]["after"][n], w) for n, w in rec.steps[last]["after"].items()
                      if n.startswith("ema")), key=lambda x: x[1])))
    rows += pool_rows(rec)
    return rows


def pool_rows(rec: Recorder) -> list[tuple[str, tuple[float, float]]]:
    """Our ``released_pool_rows`` on the released pool builds' patches and masks, against their fp16 pools."""
    head = HPModel(C, K)
    rows = []
    forwards = [f for f in rec.forwards if f["phase"] == "pool"]
    per_build = POOL // B
    for v, pool in enumerate(rec.pools):
        builds = forwards[v * per_build:(v + 1) * per_build]
        state = rec.steps[pool["step"] - 1]["after"] if pool["step"] > 0 else {}  # the EMA head at the build
        load_head(head, {**rec.init_state, **state}, rec.head_init)
        patches = list(pool["patches"])
        f_ag, f_sp, m_ag, m_c, m_d, m_f = [], [], [], [], [], []
        for fwd in builds:
            feat = features(fwd)[0].flatten(2)  # [B, C, n]
            idx_ag = [patches.pop(0) for _ in range(B)] if v == 0 else None
            idx_sp = [patches.pop(0) for _ in range(B)]
            if idx_ag is not None:
                f_ag.append(feat[torch.arange(B), :, idx_ag])
                m_ag.append(fwd["masks"][4])
            f_sp.append(feat[torch.arange(B), :, idx_sp])
            m_c.append(fwd["masks"][1])
            m_d.append(fwd["masks"][3])
            m_f.append(fwd["masks"][5])
        head.dropout = ReplayDropout()
        head.dropout.queue = ([torch.cat(m_ag)] if f_ag else []) + [torch.cat(m_c), torch.cat(m_d), torch.cat(m_f)]
        ag, sp = head.released_pool_rows(torch.cat(f_ag) if f_ag else None, torch.cat(f_sp))
        if ag is not None:
            rows.append((f"Q_ag rows, build {v} (theirs stored in fp16)", diff(F.normalize(ag, dim=1), pool["ag16"])))
        rows.append((f"Q_sp rows, build {v} (theirs stored in fp16)", diff(F.normalize(sp, dim=1), pool["sp16"])))
    return rows


def golden(rec: Recorder) -> dict[str, np.ndarray]:
    """The first iteration's inputs and the released outputs at lambda 0 and 0.25 (a few hundred KB)."""
    train, aug = [f for f in rec.forwards if f["step"] == 0 and f["phase"] == "step"]
    feat, attn = features(train)
    masks = step_masks(train, aug)
    out = {
        "feat": feat.half().numpy(), "feat_aug": features(aug)[0].half().numpy(), "attn": attn.half().numpy(),
        "masks_c": torch.stack([m for m in masks if m.shape[1] == C]).numpy(),
        "masks_k": torch.stack([m for m in masks if m.shape[1] == K]).numpy(),
        "q_ag": rec.pools[0]["ag"].numpy(), "q_sp": rec.pools[0]["sp"].numpy(),
        "rng_state": rec.steps[0]["rng"].numpy(), "neg": rec.steps[0]["neg"].numpy(),
        "proj.weight": rec.head_init[0].numpy(), "proj.bias": rec.head_init[1].numpy(),
        "hyper": np.array([TAU, RHO, ALPHA, 28.0]),
        "lambda_by_step": np.array([s["lam"] for s in rec.steps]),
        "sp_version_by_step": np.array([1 + sum(p["step"] <= t for p in rec.pools[1:]) for t in range(len(rec.steps))]),
        "schedule": np.array([WARMUP, BATCHES * EPOCHS, BATCHES, RENEW]),
    }
    for name in ("cluster1.0.weight", "cluster1.0.bias", "cluster2.0.weight", "cluster2.0.bias", "cluster2.2.weight",
                 "cluster2.2.bias"):
        out[name] = (rec.init_state[name] * 2048).round().to(torch.int8).numpy()  # exact: quantize_heads
    probe = torch.from_numpy(np.random.RandomState(0).standard_normal(C).astype(np.float32))
    for lam in (0.0, 0.25):
        t = rec.steps[0]["at"][lam]
        for key in ("ghp", "lhp", "reg", "total"):
            out[f"{lam}/{key}"] = np.array(t[key])
        for key in ("pos_ag", "pos_sp", "denominator"):
            out[f"{lam}/{key}"] = t[key].numpy()
        for name, g in t["grads"].items():
            if name == "cluster2.0.weight":  # [C, C]: row norms and one projection instead of 590 KB
                g = g.flatten(1)
                out[f"{lam}/grad/{name}/row_norm"] = g.norm(dim=1).numpy()
                out[f"{lam}/grad/{name}/probe"] = (g @ probe).numpy()
            else:
                out[f"{lam}/grad/{name}"] = g.numpy()
    return out


def our_step_times(weights: str, images: dict, *overrides: str) -> list[float]:
    """CPU-seconds of each ``HPTrainer.step_on`` over the timing loop's images (config ``overrides`` on top), at
    the default ``hp.chunk`` (the parity case's 16 exercises the chunking at 64 px; this times what users run)."""
    cfg = project_config(weights, f"hp.chunk={HPConfig().chunk}", *overrides)
    torch.manual_seed(SEED)
    seg = build_segmenter(cfg)
    paths = [f"pool{i}" for i in range(POOL)]

    class PoolShard:
        def iter_batches(self, batch_size, batch_format):
            yield {"image": images["memory_uint8"], "path": np.array(paths), "valid": np.ones(POOL, bool),
                   "error": np.array([""] * POOL)}

    plan = {"pool": {p: (i, i % (G * G)) for i, p in enumerate(paths)}}
    trainer = HPTrainer(cfg, seg, TrainContext(rank=0, world=1, device=torch.device("cpu"), shared=LocalSharedState(),
                                               total_steps=BATCHES * EPOCHS, plan=plan))
    trainer.setup({"pool": PoolShard()}.__getitem__)
    times = []
    for t in range(BATCHES * EPOCHS):
        x, x_aug = images["train_01"][t % BATCHES]
        start = time.process_time()
        trainer.step_on(x, x_aug, t)
        times.append(time.process_time() - start)
    return times


def timing(rel, weights: str, images: dict, rounds: int = 1) -> str:
    """CPU-seconds per iteration: the released loop vs ``HPTrainer.step_on`` (fp32 selection, and bf16 with the
    fp32 re-check), all with their ViT on the same images and the same augmented copies (no augmentation on any
    side), one thread; ``rounds`` times in turn (released, ours fp32, ours bf16, released, ...), so that a
    machine's load falls on every column alike. Each cell is the median over rounds of the round's value."""
    runs: dict[str, list[np.ndarray]] = {"released run.py": [], "ours, fp32": [], "ours, bf16_recheck": []}
    renew: set[int] = set()
    for _ in range(rounds):
        rec = Recorder(rel, weights, {"memory": images["memory"], "train": images["train"]}, round_features=False)
        rec.run()
        # a step lasts from its batch's start to the next batch's start or the epoch's evaluation
        runs["released run.py"].append(np.array([rec.times[i + 1] - rec.times[i] for i in range(len(rec.times) - 1)
                                                 if i not in rec.evaluations])[:BATCHES * EPOCHS])
        runs["ours, fp32"].append(np.array(our_step_times(weights, images)))
        runs["ours, bf16_recheck"].append(np.array(our_step_times(weights, images, "hp.selection=bf16_recheck")))
        renew = {p["step"] for p in rec.pools[1:]}
    plain = [t for t in range(1, BATCHES * EPOCHS) if t not in renew]
    rows = [("mean of steps " + ",".join(map(str, plain)) + " (no renewal)", lambda v: np.mean(v[plain]))]
    rows += [(f"step {t} (Q_sp renewal: {POOL} pool images)", lambda v, t=t: v[t]) for t in sorted(renew)]
    threads = torch.get_num_threads()
    lines = [f"CPU-seconds per iteration ({threads} thread{'s' * (threads > 1)}; ViT-S/16, batch {B} at {S} px, "
             f"pool of {POOL} images; steps 1-5, renewals apart; median of {rounds} rounds in turn; released / ours "
             "in brackets)",
             f"{'':<38}" + "".join(f"{name:>26}" for name in runs)]
    theirs = runs["released run.py"]
    for label, pick in rows:
        cells = []
        for name, per_round in runs.items():
            value = float(np.median([pick(v) for v in per_round]))
            ratio = float(np.median([pick(t) / pick(v) for t, v in zip(theirs, per_round)]))
            cells.append(f"{value:.3f}" + ("" if name == "released run.py" else f" ({ratio:.2f}x)"))
        lines.append(f"{label:<38}" + "".join(f"{c:>26}" for c in cells))
    lines.append("ratio of the plain steps' mean in each round (released / ours):")
    plain_mean = rows[0][1]
    for name, per_round in list(runs.items())[1:]:
        lines.append(f"  {name:<36}" + " ".join(f"{plain_mean(t) / plain_mean(v):.2f}x"
                                               for t, v in zip(theirs, per_round)))
    for name, per_round in runs.items():
        for k, v in enumerate(per_round):
            lines.append(f"{'every step, ' + name + f' (round {k + 1})':<50}{' '.join(f'{x:.2f}' for x in v)}")
    return "\n".join(lines)


def use_size(batch: int, size: int) -> None:
    """Timing at another batch and size (the parity case stays at B = 2, 64 px): the module's sizes are reset."""
    global B, S, G, POOL
    B, S, G, POOL = batch, size, size // PATCH, 2 * batch


def make_images() -> dict:
    rng = np.random.RandomState(SEED)
    memory = rng.randint(0, 256, (POOL, S, S, 3)).astype(np.uint8)
    train = rng.randint(0, 256, (BATCHES, B, S, S, 3)).astype(np.uint8)
    to01 = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255  # noqa: E731
    train01 = [(to01(b), (to01(b) * 0.8 + 0.1).flip(-1)) for b in train]  # a fixed "augmented" copy
    return {
        "memory_uint8": memory,
        "memory": [{"img": standardize(to01(memory[i:i + B]))} for i in range(0, POOL, B)],
        "train": [{"img": standardize(x), "img_aug": standardize(xa), "label": torch.zeros(B, S, S, dtype=torch.long)}
                  for x, xa in train01],
        "train_01": train01,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repo", type=Path, help="a copy of github.com/hynnsk/HP")
    parser.add_argument("--out", type=Path, default=ROOT / "tests/fixtures/parity/hp_released.npz")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--timing-rounds", type=int, default=3, help="timing runs in turn (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the timing (the parity case: 1)")
    parser.add_argument("--timing-size", default="", metavar="B,S",
                        help="time at batch B and S px instead of the parity case's 2 and 64 (e.g. 8,224)")
    args = parser.parse_args()
    if not (args.repo / "loss.py").is_file() or not (args.repo / "model/dino/DinoFeaturizer.py").is_file():
        print(f"hp parity: {args.repo} has no loss.py / model/dino/DinoFeaturizer.py; give the path of a copy of "
              "github.com/hynnsk/HP", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import warnings

    warnings.filterwarnings("ignore")
    rel = import_released(args.repo.resolve())
    weights = str(Path(tempfile.mkdtemp()) / "vit_small16.pth")
    torch.manual_seed(SEED)
    torch.save({"teacher": rel.vits.vit_small(patch_size=PATCH, num_classes=0).state_dict()}, weights)
    images = make_images()
    rec = Recorder(rel, weights, images, round_features=True)
    rec.run()
    print(table(parity_rows(rec, run_ours(rec, resync=True), run_ours(rec, resync=False))))
    finite = all(torch.isfinite(g).all() for s in rec.steps for g in s["grads"].values())
    print(f"released gradients finite at every step: {finite}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **golden(rec))
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")
    if not args.no_timing:
        if args.timing_size:
            use_size(*(int(v) for v in args.timing_size.split(",")))
            images = make_images()
        torch.set_num_threads(args.threads)
        print(timing(rel, weights, images, args.timing_rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
