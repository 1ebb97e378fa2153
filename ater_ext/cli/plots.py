"""The robustness figure (the paper's Fig. 2): test accuracy against perturbation
size, one panel per attack, one curve per method. Checkpoints that share a
method (several seeds) are drawn as their mean with a +- std band; every panel
names the dataset, the number of test points, the attack, its norm and its
steps, and the legend sits below the panels where no curve hides it."""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..atomic_io import save_figure  # noqa: E402

TITLES = {"fgsm": ("FGSM", "L-inf"), "pgd-l2": ("PGD", "L2"), "pgd-linf": ("PGD", "L-inf")}


def _short(path: str) -> str:
    """parent/file.pt: enough to tell checkpoints apart in a legend."""
    return os.path.join(os.path.basename(os.path.dirname(os.path.abspath(path))), os.path.basename(path))


def _groups(results: List[Dict[str, object]]) -> "OrderedDict[str, List[Dict[str, object]]]":
    groups: "OrderedDict[str, List[Dict[str, object]]]" = OrderedDict()
    for r in results:
        groups.setdefault(str(r["method"]), []).append(r)
    return groups


def _panel_title(attack: str, results: List[Dict[str, object]]) -> str:
    name, norm = TITLES.get(attack, (attack, ""))
    pgd = results[0]["pgd"] if "pgd" in results[0] else {}
    if name == "PGD" and pgd:
        restarts = f", {pgd['restarts']} restarts" if pgd.get("restarts", 1) > 1 else ""
        name = f"PGD-{pgd['steps']}{restarts}"
    datasets = sorted({str(r["dataset"]) for r in results})
    ns = sorted({int(r["n_test"]) for r in results})
    return f"{name} ({norm})\n{', '.join(datasets)}, n = {', '.join(map(str, ns))} test points"


def plot_robustness(results: List[Dict[str, object]], path: str) -> None:
    attacks = list(dict.fromkeys(a for r in results for a in r["attacks"]))
    panels = max(1, len(attacks))
    fig, axes = plt.subplots(1, panels, figsize=(4.4 * panels, 4.2), squeeze=False)
    for ax, attack in zip(axes[0], attacks):
        for method, runs in _groups(results).items():
            runs = [r for r in runs if attack in r["attacks"]]
            if not runs:
                continue
            eps = [p["eps"] for p in runs[0]["attacks"][attack]]
            acc = np.array([[p["accuracy"] for p in r["attacks"][attack]] for r in runs])
            if len(runs) == 1:
                label = f"{method.upper()} ({_short(str(runs[0]['checkpoint']))})"
                ax.plot(eps, acc[0], marker="o", label=label)
            else:
                mean, std = acc.mean(axis=0), acc.std(axis=0, ddof=1)
                (line,) = ax.plot(eps, mean, marker="o", label=f"{method.upper()} ({len(runs)} runs, mean +- std)")
                ax.fill_between(eps, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(_panel_title(attack, results), fontsize=9)
        ax.set_xlabel(f"perturbation size eps ({TITLES.get(attack, ('', ''))[1]})")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, max(1, len(labels))), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(labels) - 1) // 3), 1, 1))
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def plot_curves(history: List[Dict[str, float]], path: str, *, title: str = "", best_epoch: int = 0) -> None:
    """One run's training curves (``OUT/curves.png``): the training losses per
    epoch (left) and the test / validation error and the validation robust
    error (right, %), the selected epoch marked; written atomically."""
    epochs = [int(r["epoch"]) for r in history]
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(9, 3.6))
    loss_keys = list(dict.fromkeys(k for r in history for k in r if k.startswith("train_") and not k.endswith("seconds")))
    for key in loss_keys:
        ax_loss.plot(epochs, [r.get(key, np.nan) for r in history], marker=".", label=key[len("train_"):])
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (mean over the epoch)")
    ax_loss.grid(alpha=0.3)
    if loss_keys:
        ax_loss.legend(fontsize=7)
    series = [("test_error", "test error"), ("val_error", "validation error")]
    for key, label in series:
        if any(key in r for r in history):
            ax_err.plot(epochs, [r.get(key, np.nan) for r in history], marker=".", label=label)
    if any("val_robust_acc" in r for r in history):
        ax_err.plot(epochs, [100 - r.get("val_robust_acc", np.nan) for r in history], marker=".",
                    label="validation PGD error")
    if best_epoch:
        ax_err.axvline(best_epoch, color="grey", linestyle=":", label=f"best.pt (epoch {best_epoch})")
    ax_err.set_xlabel("epoch")
    ax_err.set_ylabel("error (%)")
    ax_err.grid(alpha=0.3)
    ax_err.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def plot_sweep(rows: List[Dict[str, object]], path: str, *, title: str = "") -> None:
    """``ater-sweep``'s bar chart: test error mean +- std (error bars, n seeds)
    per method of one recipe, the paper's value beside each bar as a marker."""
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * max(1, len(rows)), 3.8))
    xs = np.arange(len(rows))
    means = [float(r["test_error_mean"]) for r in rows]
    stds = [float(r["test_error_std"]) if r["n"] > 1 else 0.0 for r in rows]
    ax.bar(xs, means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8, label="ours: mean +- std over seeds")
    paper = [(x, float(r["paper"])) for x, r in zip(xs, rows) if r.get("paper") not in (None, "")]
    if paper:
        ax.scatter([p[0] for p in paper], [p[1] for p in paper], marker="D", color="tab:red", zorder=3,
                   label="paper")
    ax.set_xticks(xs, [f"{str(r['method']).upper()}\n(n={r['n']})" for r in rows], fontsize=8)
    ax.set_ylabel("test error (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
