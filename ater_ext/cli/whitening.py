"""``python -m ater_ext.cli.whitening``: the ZCA gains of a dataset, i.e. how a
whitened-space radius maps to [0, 1] pixel space
(:func:`ater_ext.preprocessing.whitening_radii`)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from ..data import DATASETS, load_dataset
from ..preprocessing import fit_zca, whitening_radii


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the whitening gains of a dataset (``python -m ater_ext.cli.whitening``)."""

    p = argparse.ArgumentParser(prog="python -m ater_ext.cli.whitening", description=main.__doc__)
    p.add_argument("--dataset", choices=DATASETS, default="cifar10")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--zca-eps", type=float, default=0.0)
    p.add_argument("--whitened-eps", type=float, default=8.0, help="a whitened-space radius to convert")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        data = load_dataset(args.dataset, args.data_dir)
        layer = fit_zca(data.x_train, eps=args.zca_eps, device=torch.device(args.device))
    except Exception as exc:  # DataError, ValueError: one line, as the command-line tools do
        print(f"{p.prog}: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    r = whitening_radii(layer, data.x_train)
    e = args.whitened_eps
    print(f"{args.dataset}: {len(data.x_train)} training images, D = {layer.zca_mean.numel()}")
    print(f"  ||W||_2 = {r['op_norm']:.4g}: pixel radius inside the whitened ball of {e:g}: {e / r['op_norm']:.4g}")
    print(f"  ||W^-1||_2 = {r['inv_op_norm']:.4g}: pixel ball holding the whitened ball: {e * r['inv_op_norm']:.4g}")
    print(f"  ||W^-1||_F / sqrt(D) = {r['isotropic']:.4g}: pixel length of an isotropic whitened "
          f"perturbation of {e:g}: {e * r['isotropic']:.4g}")
    print(f"  median ||x - m|| / ||W (x - m)|| = {r['data_ratio']:.4g}: {e * r['data_ratio']:.4g}")
    return 0




if __name__ == "__main__":
    raise SystemExit(main())
