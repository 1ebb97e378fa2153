"""Fixed input preprocessing that is part of the model, and data augmentation.

The paper follows the VAT paper (Miyato et al. 2018), whose official code
(takerum/vat_tf) ZCA-whitens CIFAR-10 before training, so that its radii
(``eps_vat`` 8.0 with augmentation) are lengths in *whitened* space. Here the
whitening is a fixed layer at the front of the model (:class:`ZCA`, fitted once
on the training images, stored as buffers in the ``state_dict`` so that a
checkpoint carries it and ``ater-eval`` loads it), so the model takes pixels in
``[0, 1]`` and every radius, ``x_max``, clamp and attack lives in pixel space,
where a user expects them.

How a whitened-space radius maps to pixel space is measured on the data by
:func:`whitening_radii`: for the whitening matrix ``W`` (symmetric),

* ``||W||_2`` (operator norm): a pixel ball of radius ``eps / ||W||_2`` lies
  inside the whitened ball of radius ``eps`` (the most conservative mapping);
* ``||W^-1||_2``: the whitened ball lies inside the pixel ball of radius
  ``eps * ||W^-1||_2``;
* ``||W^-1||_F / sqrt(D)`` (the root-mean-square per-pixel standard deviation
  of the data): the pixel length of a whitened perturbation of length ``eps``
  whose direction is isotropic in whitened space (in expectation over
  directions, exactly in mean square). The recipes use this one (see
  ``ater_ext/recipes/cifar10*.toml``).

``python -m ater_ext.cli.whitening --dataset cifar10 --data-dir DIR`` prints the
three for a dataset.

:func:`augment` is the VAT code's augmentation (random translation by up to 2
pixels with zero padding, random horizontal flip), applied to the pixel data
before the objective, drawn from a caller-given generator so that a resumed
run replays it.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PREPROCESSING", "ZCA", "fit_zca", "build_preprocess", "from_state_dict", "whitening_radii",
           "AUGMENTATIONS", "parse_augment", "augment", "TRANSLATE_PX"]

PREPROCESSING = ("none", "zca")
AUGMENTATIONS = ("translate", "flip")
TRANSLATE_PX = 2  # vat_tf dataset_utils.transform: pad 2 px, random 32x32 crop
VAT_ZCA_REG = 1e-6  # vat_tf dataset_utils.ZCA(reg=1e-6): components = U diag(1/sqrt(S) + reg) U^T


class ZCA(nn.Module):
    """``z = (flatten(x) - mean) @ matrix``, reshaped back to ``x``'s shape.

    ``mean``: ``[D]``, ``matrix``: ``[D, D]`` (symmetric), both buffers: saved
    in the ``state_dict``, moved by ``.to()``, never trained.

    x: [B, C, H, W] with C*H*W = D   out: [B, C, H, W] (fp32, or fp64 for fp64 inputs, also under autocast)
    """

    def __init__(self, mean: Tensor, matrix: Tensor):
        super().__init__()
        if mean.dim() != 1 or matrix.shape != (mean.numel(), mean.numel()):
            raise ValueError(f"ZCA: mean must be [D] and matrix [D, D], got {tuple(mean.shape)} and "
                             f"{tuple(matrix.shape)}")
        self.register_buffer("zca_mean", mean.detach().clone())
        self.register_buffer("zca_matrix", matrix.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.zca_mean.numel():
            raise ValueError(f"ZCA: inputs have {flat.shape[1]} features per sample, the whitening was fitted on "
                             f"{self.zca_mean.numel()}")
        # fp32 (fp64 for fp64 inputs) also under autocast: the gains reach ~1e3, too much for fp16
        dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = (flat.to(dtype) - self.zca_mean.to(dtype)) @ self.zca_matrix.to(dtype)
        return z.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"D={self.zca_mean.numel()}"


def fit_zca(x: Tensor, *, eps: float = 0.0, device: Optional[torch.device] = None) -> ZCA:
    """ZCA whitening fitted on images ``x`` ``[N, ...]`` as the VAT code does.

    With ``S``, ``U`` the eigenvalues and eigenvectors of the covariance
    ``(x - mean)^T (x - mean) / N``, the matrix is
    ``U diag(1 / sqrt(S + eps) + 1e-6) U^T``: with ``eps=0`` exactly vat_tf's
    ``ZCA(data, reg=1e-6)``. vat_tf fits on data scaled as ``(x*255 - 127.5)/255
    = x - 0.5``; the shift cancels against the mean, so fitting on ``[0, 1]``
    pixels gives the same matrix. Computed in fp64 on ``device`` (the eigen
    decomposition of a 3072x3072 covariance takes seconds on a GPU, about a
    minute on one CPU core). When ``N <= D`` the covariance is singular: its
    null space gets the gain ``1 / sqrt(eps) + 1e-6``, so ``eps > 0`` is then
    required (a ``ValueError`` otherwise).
    """
    if x.dim() < 2 or x.shape[0] < 2:
        raise ValueError(f"fit_zca: need at least 2 samples [N, ...], got {tuple(x.shape)}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"fit_zca: eps must be finite and >= 0, got {eps}")
    device = torch.device("cpu") if device is None else torch.device(device)
    flat = x.reshape(x.shape[0], -1).to(device=device, dtype=torch.float64)
    n, d = flat.shape
    mean = flat.mean(0)
    centred = flat - mean
    if n > d:
        cov = centred.T @ centred / n
        s, u = torch.linalg.eigh(cov)  # ascending
        singular = float(s.min()) <= float(s.max()) * 1e-12
        null = None
    else:  # fewer samples than dimensions: the span from an SVD of the data, the rest is the null space
        _, sv, vh = torch.linalg.svd(centred, full_matrices=False)
        s, u = sv.pow(2) / n, vh.T
        keep = s > s.max() * 1e-12
        s, u = s[keep], u[:, keep]
        singular, null = True, torch.eye(d, dtype=torch.float64, device=device) - u @ u.T
    if singular and eps == 0:
        raise ValueError(f"fit_zca: the covariance of the {n} images ({d} values each) is singular "
                         f"({'fewer images than dimensions' if n <= d else 'eigenvalues down to 0'}); "
                         f"set the ZCA regulariser (--zca-eps, e.g. 0.01) > 0")
    gains = 1.0 / torch.sqrt(s.clamp_min(0) + eps) + VAT_ZCA_REG
    matrix = (u * gains) @ u.T
    if null is not None:
        matrix = matrix + (1.0 / math.sqrt(eps) + VAT_ZCA_REG) * null
    matrix = (matrix + matrix.T) / 2
    return ZCA(mean.float().cpu(), matrix.float().cpu())


def build_preprocess(kind: str, x_train: Tensor, *, zca_eps: float = 0.0,
                     device: Optional[torch.device] = None) -> Optional[nn.Module]:
    """The fixed layer of ``kind`` (one of :data:`PREPROCESSING`) fitted on ``x_train``; None for ``"none"``."""
    if kind == "none":
        return None
    if kind == "zca":
        return fit_zca(x_train, eps=zca_eps, device=device)
    raise ValueError(f"build_preprocess: unknown preprocessing {kind!r}; choose one of {', '.join(PREPROCESSING)}")


def from_state_dict(state_dict: Dict[str, Tensor], prefix: str) -> Optional[nn.Module]:
    """The preprocessing layer whose buffers sit under ``prefix`` in ``state_dict``
    (shapes taken from the tensors), or None when there is none. Lets a model
    built without it load a checkpoint that has one (``ater_ext.models``)."""
    mean, matrix = state_dict.get(prefix + "zca_mean"), state_dict.get(prefix + "zca_matrix")
    if mean is None and matrix is None:
        return None
    if mean is None or matrix is None:
        raise ValueError(f"state_dict has only one of {prefix}zca_mean / {prefix}zca_matrix")
    return ZCA(torch.zeros_like(mean), torch.zeros_like(matrix))


@torch.no_grad()
def whitening_radii(layer: ZCA, x: Optional[Tensor] = None) -> Dict[str, float]:
    """The gains that map a whitened-space radius to pixel space (module
    docstring): ``op_norm`` ``||W||_2``, ``inv_op_norm`` ``||W^-1||_2``,
    ``isotropic`` ``||W^-1||_F / sqrt(D)``; with images ``x``, also
    ``data_ratio``: the median over images of ``||x - mean|| / ||W (x - mean)||``."""
    w = layer.zca_matrix.double()
    s = torch.linalg.eigvalsh((w + w.T) / 2).abs()
    out = {"op_norm": float(s.max()), "inv_op_norm": float(1 / s.min()),
           "isotropic": float(torch.sqrt((1 / s).pow(2).mean()))}
    if x is not None:
        centred = x.reshape(x.shape[0], -1).double() - layer.zca_mean.double()
        out["data_ratio"] = float((centred.norm(dim=1) / (centred @ w).norm(dim=1).clamp_min(1e-30)).median())
    return out


# ------------------------------------------------------------------ augmentation
def parse_augment(value) -> str:
    """``--augment``: a comma-separated string or a list of :data:`AUGMENTATIONS`
    (or ``none``), as a canonical string (``""``, ``"translate"``,
    ``"flip"``, ``"translate,flip"``)."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    names = [str(v).strip() for v in items if str(v).strip() and str(v).strip() != "none"]
    unknown = [v for v in names if v not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown[0]!r}; choose from {', '.join(AUGMENTATIONS)} or none")
    return ",".join(a for a in AUGMENTATIONS if a in names)


def augment(x: Tensor, kinds: str, generator: torch.Generator) -> Tensor:
    """``x`` ``[B, C, H, W]`` randomly translated by up to :data:`TRANSLATE_PX`
    pixels each way (zero padding, as vat_tf's ``tf.pad``) and/or flipped
    left-right, per sample; the draws come from ``generator`` (a CPU generator).
    Returns ``x`` itself when ``kinds`` is empty."""
    kinds_set = set(filter(None, kinds.split(",")))
    if not kinds_set or x.shape[0] == 0:
        return x
    b = x.shape[0]
    if "translate" in kinds_set:
        p = TRANSLATE_PX
        shifts = torch.randint(0, 2 * p + 1, (b, 2), generator=generator)
        padded = F.pad(x, (p, p, p, p))
        h, w = x.shape[-2:]
        out = torch.empty_like(x)
        for dy, dx in torch.unique(shifts, dim=0).tolist():
            rows = ((shifts[:, 0] == dy) & (shifts[:, 1] == dx)).nonzero().flatten().to(x.device)
            out[rows] = padded[rows, :, dy:dy + h, dx:dx + w]
        x = out
    if "flip" in kinds_set:
        flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip.view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)
    return x
