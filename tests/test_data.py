"""Datasets: splits, the torchvision formats (written here as small files in the real format),
image folders, the synthetic dataset and augmentation."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch

from certify.data import (DATASETS, ImageDataset, augment_batch, load_dataset, make_synthetic,
                          resolve_val_split, split_indices)
from certify.errors import ConfigError, DataError


# ---- writers for the official file formats -------------------------------------------------------

def write_cifar10(root, n_per_batch=6, seed=0):
    """CIFAR-10's python version: five data batches, a test batch and batches.meta (pickles)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, size=n_per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * n_per_batch}, f, protocol=2)
        written[name] = (data, labels)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072, b"num_cases_per_batch": n_per_batch}, f, protocol=2)
    return written


def write_cifar100(root, n=12, n_test=5):
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, m in (("train", n), ("test", n_test)):
        with open(folder / name, "wb") as f:
            pickle.dump({b"fine_labels": [int(x) for x in rng.integers(0, 100, m)],
                         b"coarse_labels": [0] * m, b"data": rng.integers(0, 256, (m, 3072), dtype=np.uint8)}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f)


def write_idx(folder, prefix, images, labels):
    """MNIST's idx files (uncompressed, as torchvision keeps them in <root>/MNIST/raw)."""
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, h, w) + images.tobytes())
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def write_mnist(root, kind="MNIST", n=20, n_test=7):
    rng = np.random.default_rng(2)
    raw = root / kind / "raw"
    tr = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)
    te = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_test).astype(np.uint8)
    write_idx(raw, "train", *tr)
    write_idx(raw, "t10k", *te)
    return tr, te


# ---- torchvision datasets ------------------------------------------------------------------------

def test_cifar10_reads_the_python_batches(tmp_path):
    written = write_cifar10(tmp_path)
    pool = load_dataset("cifar10", "all", data_dir=tmp_path)
    assert len(pool) == 30 and pool.input_shape == (3, 32, 32) and pool.num_classes == 10
    assert pool.class_names[0] == "airplane" and pool.class_names[-1] == "truck"
    data, labels = written["data_batch_1"]
    # Row-major 3072 = 3 x 32 x 32 (channel planes), exactly as torchvision reads it.
    assert torch.equal(pool.images[:6], torch.from_numpy(data.reshape(6, 3, 32, 32)))
    assert pool.labels[:6].tolist() == labels
    assert pool.mean == (0.4914, 0.4822, 0.4465) and pool.std == (0.2507,) * 3
    test = load_dataset("cifar10", "test", data_dir=tmp_path)
    assert len(test) == 6 and test.labels.tolist() == written["test_batch"][1]
    x, y = test[0]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and 0 <= float(x.min()) <= float(x.max()) <= 1
    assert isinstance(y, int)


def test_train_val_split_is_seeded_disjoint_and_covers_the_pool(tmp_path):
    write_cifar10(tmp_path)
    kw = dict(data_dir=tmp_path, val_split=8)
    tr, va = load_dataset("cifar10", "train", **kw), load_dataset("cifar10", "val", **kw)
    assert (len(tr), len(va)) == (22, 8)
    pool = load_dataset("cifar10", "all", data_dir=tmp_path)
    rows = {bytes(im.numpy().tobytes()) for im in pool.images}
    got = [bytes(im.numpy().tobytes()) for im in torch.cat([tr.images, va.images])]
    assert len(set(got)) == len(rows) and set(got) == rows
    again = load_dataset("cifar10", "val", **kw)
    assert torch.equal(again.images, va.images) and again.fingerprint == va.fingerprint
    other = load_dataset("cifar10", "val", seed=1, **kw)
    assert not torch.equal(other.images, va.images) and other.fingerprint != va.fingerprint
    assert len(load_dataset("cifar10", "val", data_dir=tmp_path, val_split=0.25)) == 8  # 25% of 30, rounded


def test_cifar100_fine_labels(tmp_path):
    write_cifar100(tmp_path)
    ds = load_dataset("cifar100", "test", data_dir=tmp_path)
    assert len(ds) == 5 and ds.num_classes == 100 and ds.class_names[3] == "c3"


def test_cifar_pickle_that_runs_code_is_refused(tmp_path):
    write_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


@pytest.mark.parametrize("name,kind", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_family_reads_idx_files(tmp_path, name, kind):
    (tr_x, tr_y), (te_x, te_y) = write_mnist(tmp_path, kind)
    pool = load_dataset(name, "all", data_dir=tmp_path)
    assert pool.input_shape == (1, 28, 28) and len(pool) == 20
    assert torch.equal(pool.images[:, 0], torch.from_numpy(tr_x)) and pool.labels.tolist() == tr_y.tolist()
    test = load_dataset(name, "test", data_dir=tmp_path)
    assert test.labels.tolist() == te_y.tolist()
    assert pool.hflip is (name == "fashion-mnist")  # no mirrored digits
    assert len(load_dataset(name, "val", data_dir=tmp_path)) == 2  # 10% of a small pool


def test_missing_dataset_says_how_to_get_it(tmp_path):
    for name in ("cifar10", "cifar100", "mnist", "fashion-mnist"):
        with pytest.raises(DataError, match="--download.*--data-dir"):
            load_dataset(name, "train", data_dir=tmp_path / "nothing")


def test_download_failure_is_a_data_error(tmp_path, monkeypatch):
    import certify.data

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(certify.data, "_torchvision_class", lambda key: offline)
    with pytest.raises(DataError, match="could not download cifar10.*unreachable"):
        load_dataset("cifar10", "train", data_dir=tmp_path, download=True)


def test_wrong_input_shape_for_a_fixed_size_dataset(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(DataError, match="3x32x32.*1x28x28"):
        load_dataset("cifar10", "train", data_dir=tmp_path, input_shape=(1, 28, 28))


# ---- image folders ------------------------------------------------------------------------------

def _write_folder(root, classes=("cat", "dog"), per_class=3, size=(40, 30), mode="RGB"):
    from PIL import Image

    rng = np.random.default_rng(3)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")


def test_imagefolder_resizes_and_crops_to_the_input_shape(tmp_path):
    _write_folder(tmp_path / "imgs", mode="L")
    ds = load_dataset("imagefolder", "all", data_dir=tmp_path / "imgs", input_shape=(3, 16, 16))
    assert ds.images.shape == (6, 3, 16, 16) and ds.class_names == ["cat", "dog"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    gray = load_dataset("imagefolder", "all", data_dir=tmp_path / "imgs", input_shape=(1, 28, 28), workers=2)
    assert gray.images.shape == (6, 1, 28, 28) and len(gray.mean) == 1
    with pytest.raises(DataError, match="no test split"):
        load_dataset("imagefolder", "test", data_dir=tmp_path / "imgs")


def test_imagefolder_with_train_and_test_subfolders(tmp_path):
    _write_folder(tmp_path / "d" / "train", per_class=5)
    _write_folder(tmp_path / "d" / "test", per_class=2)
    assert len(load_dataset("imagefolder", "test", data_dir=tmp_path / "d")) == 4
    assert len(load_dataset("imagefolder", "all", data_dir=tmp_path / "d")) == 10
    assert len(load_dataset("imagefolder", "val", data_dir=tmp_path / "d")) == 1


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="needs --data-dir"):
        load_dataset("imagefolder", "all")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("imagefolder", "all", data_dir=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        load_dataset("imagefolder", "all", data_dir=tmp_path / "empty")
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(DataError, match="has no images"):
        load_dataset("imagefolder", "all", data_dir=tmp_path / "empty")
    (tmp_path / "empty" / "cls" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot decode"):
        load_dataset("imagefolder", "all", data_dir=tmp_path / "empty")


# ---- synthetic ----------------------------------------------------------------------------------

def test_synthetic_is_deterministic_balanced_and_not_noise():
    a, la = make_synthetic(200, seed=5)
    b, lb = make_synthetic(200, seed=5)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(make_synthetic(200, seed=6)[0], a)
    assert torch.bincount(la, minlength=10).tolist() == [20] * 10
    # Structure, not noise: neighbouring pixels are strongly correlated.
    x = a.float()
    corr = torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1]
    assert corr > 0.7


def test_synthetic_classes_are_separable_by_a_simple_statistic():
    # Vertical vs horizontal stripes differ in where the energy of the image gradient lies.
    x, y = make_synthetic(400, seed=0)
    x = x.float().mean(1)
    gx = (x[:, :, 1:] - x[:, :, :-1]).abs().mean((1, 2))
    gy = (x[:, 1:, :] - x[:, :-1, :]).abs().mean((1, 2))
    h, v = y == 0, y == 1
    assert (gy[h] > gx[h]).float().mean() > 0.95 and (gx[v] > gy[v]).float().mean() > 0.95


def test_synthetic_splits_shapes_and_size():
    tr = load_dataset("synthetic", "train", size=300)
    va = load_dataset("synthetic", "val", size=300)
    te = load_dataset("synthetic", "test", size=300)
    assert (len(tr), len(va), len(te)) == (270, 30, 60)
    assert not set(te.fingerprint) == set() and te.fingerprint != va.fingerprint
    g = load_dataset("synthetic", "val", size=300, input_shape=(1, 28, 28), limit=7)
    assert g.images.shape == (7, 1, 28, 28)
    with pytest.raises(ConfigError):
        load_dataset("synthetic", "val", size=3)


# ---- general ------------------------------------------------------------------------------------

def test_unknown_names_and_bad_arguments():
    with pytest.raises(DataError, match="unknown dataset 'cifar11'.*did you mean cifar10"):
        load_dataset("cifar11")
    with pytest.raises(DataError, match="unknown split"):
        load_dataset("synthetic", "holdout")
    with pytest.raises(DataError, match="1 or 3 channels"):
        load_dataset("synthetic", input_shape=(2, 32, 32))
    with pytest.raises(DataError, match="validation split is empty"):
        load_dataset("synthetic", "val", size=100, val_split=0)
    with pytest.raises(ConfigError, match="leaves no training images"):
        load_dataset("synthetic", "train", size=100, val_split=100)
    assert set(DATASETS) == {"cifar10", "cifar100", "mnist", "fashion-mnist", "imagefolder", "synthetic"}


def test_empty_dataset_and_label_checks():
    with pytest.raises(DataError):
        ImageDataset("x", "all", torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.int64), ["a"], [0.5], [0.2])
    with pytest.raises(DataError, match="labels outside"):
        ImageDataset("x", "all", torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 5]), ["a", "b"],
                     [0.5], [0.2])
    ds = ImageDataset("x", "all", torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"],
                      [0.5], [0.2])
    with pytest.raises(DataError, match="1x8x8 but the model expects 3x32x32"):
        ds.check_shape((3, 32, 32))


def test_val_split_rules():
    assert resolve_val_split(None, 50000) == 5000
    assert resolve_val_split(None, 60000) == 5000
    assert resolve_val_split(None, 4000) == 400
    assert resolve_val_split(0.2, 100) == 20 and resolve_val_split(7, 100) == 7 and resolve_val_split(0, 100) == 0
    with pytest.raises(ConfigError):
        resolve_val_split(1.5, 100)
    tr, va = split_indices(10, 3, seed=0)
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(10)) and len(va) == 3


def test_augment_batch_crops_flips_and_is_seeded():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.int64).remainder(251).add(1).to(torch.uint8).view(2, 3, 8, 8)
    a = augment_batch(x, torch.Generator().manual_seed(0), padding=2)
    b = augment_batch(x, torch.Generator().manual_seed(0), padding=2)
    assert torch.equal(a, b) and a.shape == x.shape and a.dtype == torch.uint8
    # Every output is a shifted (maybe mirrored) window of the zero-padded input.
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        ok = any(torch.equal(a[i], w)
                 for oy in range(5) for ox in range(5)
                 for w in (padded[i, :, oy:oy + 8, ox:ox + 8], padded[i, :, oy:oy + 8, ox:ox + 8].flip(-1)))
        assert ok
    # Flip only: with padding 0 half the images come back mirrored, the rest untouched.
    many = x[:1].expand(64, -1, -1, -1)
    out = augment_batch(many, torch.Generator().manual_seed(1), padding=0, hflip=True)
    flipped = sum(torch.equal(o, x[0].flip(-1)) for o in out)
    same = sum(torch.equal(o, x[0]) for o in out)
    assert flipped + same == 64 and 16 < flipped < 48
    no_flip = augment_batch(many, torch.Generator().manual_seed(1), padding=0, hflip=False)
    assert torch.equal(no_flip, many)


def test_limit_takes_a_seeded_random_subset_not_a_prefix(tmp_path):
    _write_folder(tmp_path / "imgs", classes=("a", "b", "c", "d"), per_class=5, size=(8, 8))
    kw = dict(data_dir=tmp_path / "imgs", input_shape=(3, 8, 8))
    pool = load_dataset("imagefolder", "all", **kw)
    sub = load_dataset("imagefolder", "all", limit=8, **kw)
    assert len(sub) == 8 and torch.equal(sub.images, load_dataset("imagefolder", "all", limit=8, **kw).images)
    assert len(set(sub.labels.tolist())) > 2  # a prefix of the class-sorted files would hold 2 classes
    rows = {im.numpy().tobytes() for im in pool.images}
    assert all(im.numpy().tobytes() in rows for im in sub.images)
