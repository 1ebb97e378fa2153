"""The robustness figure (the paper's Fig. 2): test accuracy against perturbation
size, one panel per attack, one curve per checkpoint."""
from __future__ import annotations

from typing import Dict, List

import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from ..atomic_io import save_figure  # noqa: E402

TITLES = {"fgsm": "FGSM (L-inf)", "pgd-l2": "PGD (L2)", "pgd-linf": "PGD (L-inf)"}


def _short(path: str) -> str:
    """parent/file.pt: enough to tell checkpoints apart in a legend."""
    return os.path.join(os.path.basename(os.path.dirname(os.path.abspath(path))), os.path.basename(path))


def plot_robustness(results: List[Dict[str, object]], path: str) -> None:
    attacks = list(dict.fromkeys(a for r in results for a in r["attacks"]))
    fig, axes = plt.subplots(1, max(1, len(attacks)), figsize=(4.2 * max(1, len(attacks)), 3.6), squeeze=False)
    for ax, attack in zip(axes[0], attacks):
        for r in results:
            points = r["attacks"].get(attack, [])
            ax.plot([p["eps"] for p in points], [p["accuracy"] for p in points], marker="o",
                    label=f"{r['method'].upper()} ({_short(r['checkpoint'])})")
        ax.set_title(TITLES.get(attack, attack))
        ax.set_xlabel("perturbation size eps")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
