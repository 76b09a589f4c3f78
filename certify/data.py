"""Datasets for training and certification, decoded once and kept in memory as uint8 tensors.

:func:`load_dataset` returns an :class:`ImageDataset` for one split of one dataset:

- ``cifar10``, ``cifar100``, ``mnist``, ``fashion-mnist``: the torchvision datasets, read from
  ``data_dir`` (``download=True`` fetches them with torchvision). CIFAR is read from its official
  python batches by a restricted unpickler that only rebuilds numpy arrays (no arbitrary code).
- ``imagefolder``: any folder of class subfolders (torchvision's ``ImageFolder`` layout), resized
  (shorter side) and centre-cropped to ``input_shape``. If the folder has ``train/`` and ``test/``
  (or ``val/``) subfolders of class folders, those are the training pool and the test split.
- ``synthetic``: a built-in, learnable, procedural dataset (10 classes of stripes, checkerboards
  and shapes with random position, size, colour and noise), deterministic by ``seed``.

Splits (the paper's recipe selected models on the test set; lipcert never does, see paper.md 7):

- ``train`` / ``val``: the official training set (the "pool"), split by a seeded permutation into
  ``val_split`` validation images and the rest for training. Default ``val_split``:
  ``min(5000, 10% of the pool)``, i.e. 5000 for CIFAR and MNIST, 10% for small sets. A float in
  (0, 1) is a fraction of the pool; 0 means no validation split.
- ``all``: the whole pool (train + val). Use it to certify a user-supplied folder as a whole.
- ``test``: the official test split (torchvision sets, an image folder with a ``test/`` or ``val/``
  subfolder, or fresh synthetic images drawn from an independent seed).

A checkpoint's data (:func:`dataset_for_checkpoint`): the dataset, data seed, validation split,
synthetic size and image folder that training recorded, so that every command (``certify``,
``attack``, the demo) sees the validation images training validated on, never training images.

Augmentation (:func:`augment_batch`) works on whole uint8 batches: random crop with zero padding
and a horizontal flip where the dataset allows it (not for digits).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .errors import CheckpointError, ConfigError, DataError

DATASETS = ("cifar10", "cifar100", "mnist", "fashion-mnist", "imagefolder", "synthetic")
SPLITS = ("train", "val", "test", "all")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DEFAULT_VAL_SPLIT = 5000
SYNTHETIC_SIZE = 4000
SYNTHETIC_CLASSES = ("h-stripes", "v-stripes", "checkerboard", "disk", "ring", "square", "plus",
                     "x-cross", "triangle", "dots")

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MNIST_CLASSES = tuple(str(i) for i in range(10))
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot")

# Normalisation: per-channel mean and ONE std shared by all channels. The certificate divides by
# the model's Lipschitz bound, which carries 1/min_c(std_c); a shared std loses nothing there.
_NORMALISATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), 0.2507),  # the paper's values (paper.md 5)
    "cifar100": ((0.5071, 0.4865, 0.4409), 0.2673),
    "mnist": ((0.1307,), 0.3081),
    "fashion-mnist": ((0.2860,), 0.3530),
}


def default_data_dir() -> Path:
    """``$LIPCERT_DATA_DIR``, else ``~/.cache/lipcert/data``."""
    env = os.environ.get("LIPCERT_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lipcert" / "data"


class ImageDataset(Dataset):
    """One split of a dataset, held in memory: ``images`` (uint8, N x C x H x W) and ``labels``
    (int64, N). Items are ``(float32 C x H x W tensor in [0, 1], int label)``.

    Attributes: ``name``, ``split``, ``class_names``, ``input_shape`` (C, H, W), ``num_classes``,
    ``mean``/``std`` (per-channel normalisation a lipcert model for this data should use),
    ``hflip`` (whether horizontal flips are a valid augmentation), ``fingerprint`` (a short hash of
    the identity and content, stored in checkpoints).
    """

    def __init__(self, name: str, split: str, images: torch.Tensor, labels: torch.Tensor,
                 class_names: Sequence[str], mean: Sequence[float], std: Sequence[float],
                 hflip: bool = True, source: str = "") -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(f"{name}: images must be a uint8 N x C x H x W tensor, got "
                            f"{images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise DataError(f"{name}: {labels.shape[0]} labels for {images.shape[0]} images")
        self.name, self.split, self.source = name, split, source
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64).contiguous()
        self.class_names = [str(c) for c in class_names]
        self.num_classes = len(self.class_names)
        self.input_shape = tuple(int(s) for s in images.shape[1:])
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.hflip = bool(hflip)
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= self.num_classes):
            raise DataError(f"{name}: labels outside 0..{self.num_classes - 1}")
        self.fingerprint = _fingerprint(name, split, self.images, self.labels, self.class_names)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float().div_(255), int(self.labels[index])

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images and labels at ``indices`` (one indexing op, no per-item Python)."""
        return self.images[indices], self.labels[indices]

    def subset(self, indices: torch.Tensor) -> "ImageDataset":
        """The images at ``indices``, as a dataset of the same name and split (its own fingerprint)."""
        ds = ImageDataset(self.name, self.split, self.images[indices], self.labels[indices], self.class_names,
                          self.mean, self.std, hflip=self.hflip, source=self.source)
        for attr in ("val_split", "seed"):
            if hasattr(self, attr):
                setattr(ds, attr, getattr(self, attr))
        return ds

    def check_shape(self, input_shape: Sequence[int]) -> None:
        """Raise :class:`DataError` unless the images have shape ``input_shape`` (C, H, W)."""
        if tuple(input_shape) != self.input_shape:
            raise DataError(f"{self.name} images are {'x'.join(map(str, self.input_shape))} but the model "
                            f"expects {'x'.join(map(str, input_shape))}")

    def __repr__(self) -> str:
        return (f"ImageDataset({self.name!r}, split={self.split!r}, n={len(self)}, "
                f"shape={self.input_shape}, classes={self.num_classes})")


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]."""
    return images.float().div_(255)


def augment_batch(images: torch.Tensor, generator: torch.Generator, *, padding: int = 4,
                  hflip: bool = True) -> torch.Tensor:
    """Random crop with ``padding`` zero pixels on each side, and a random horizontal flip (with
    probability 1/2, when ``hflip``), on a uint8 batch, with a seeded ``generator``.

    Implemented as one gather over the padded batch, so it costs about one copy of the batch.
    """
    n, c, h, w = images.shape
    if n == 0 or (padding <= 0 and not hflip):
        return images
    p = max(int(padding), 0)
    padded = torch.nn.functional.pad(images, (p, p, p, p)) if p else images
    oy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5 if hflip else torch.zeros(n, dtype=torch.bool)
    ar_h, ar_w = torch.arange(h), torch.arange(w)
    rows = oy[:, None] + ar_h  # (n, h)
    cols = torch.where(flip[:, None], ox[:, None] + (w - 1 - ar_w), ox[:, None] + ar_w)  # (n, w)
    idx_n = torch.arange(n)[:, None, None, None]
    idx_c = torch.arange(c)[None, :, None, None]
    return padded[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]].contiguous()


# ---- splits -------------------------------------------------------------------------------------

def resolve_val_split(val_split: float | int | None, pool_size: int) -> int:
    """Number of validation images: ``None`` -> min(5000, 10% of the pool); a float in (0, 1) ->
    that fraction; an integer >= 0 -> that many (it must leave at least one training image)."""
    if val_split is None:
        return min(DEFAULT_VAL_SPLIT, max(1, round(0.1 * pool_size))) if pool_size > 1 else 0
    v = float(val_split)
    if v < 0 or v != v:
        raise ConfigError(f"val_split must be >= 0, got {val_split}")
    if 0 < v < 1:
        n = max(1, round(v * pool_size))
    else:
        if v != int(v):
            raise ConfigError(f"val_split must be a fraction in (0, 1) or a whole number, got {val_split}")
        n = int(v)
    if n >= pool_size and pool_size > 0:
        raise ConfigError(f"val_split {val_split} leaves no training images (the pool has {pool_size})")
    return n


def split_indices(pool_size: int, val_count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, val) index split of a pool; each part sorted, so that the order of the
    images (and the dataset fingerprint) does not depend on the permutation."""
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(pool_size, generator=g)
    val, train = perm[:val_count].sort().values, perm[val_count:].sort().values
    return train, val


def subset_indices(n: int, limit: int, seed: int) -> torch.Tensor:
    """The ``limit`` images a ``limit`` keeps of ``n``: a random subset seeded by ``seed + 1``,
    in order. Not the first images: image folders list their files class by class, so a prefix
    would hold only the first classes."""
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + 1))[: int(limit)]
    return keep.sort().values


def canonical_name(name: str) -> str:
    """A dataset name as lipcert spells it (lower case, ``-`` for ``_``, a few aliases)."""
    key = str(name).strip().lower().replace("_", "-")
    return {"fashionmnist": "fashion-mnist", "image-folder": "imagefolder", "folder": "imagefolder"}.get(key, key)


# ---- public entry point -------------------------------------------------------------------------

def load_dataset(name: str, split: str = "val", *, data_dir: str | os.PathLike | None = None,
                 download: bool = False, val_split: float | int | None = None, seed: int = 0,
                 input_shape: Sequence[int] | None = None, limit: int | None = None,
                 size: int | None = None, workers: int = 0) -> ImageDataset:
    """Load one split of a dataset into memory (see the module docstring for names and splits).

    Args:
        name: one of :data:`DATASETS`.
        split: ``train``, ``val``, ``test`` or ``all``.
        data_dir: where torchvision datasets live (default :func:`default_data_dir`), or the image
            folder itself for ``imagefolder`` (required there).
        download: fetch a missing torchvision dataset (needs the internet).
        val_split: validation images carved from the training pool (see :func:`resolve_val_split`).
        seed: seeds the train/val split (and the synthetic images). Keep it fixed across runs so
            that every run is validated on the same images.
        input_shape: (C, H, W) the images must have. Image folders and synthetic data are produced
            at this shape; a torchvision dataset of another shape raises :class:`DataError`.
        limit: keep a seeded random subset of ``limit`` images of the split (quick experiments).
        size: number of images in the synthetic pool (default 4000); synthetic only.
        workers: threads for decoding image files (image folders only; 0 = one thread).
    """
    key = canonical_name(name)
    if key not in DATASETS:
        import difflib

        close = difflib.get_close_matches(key, DATASETS, n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise DataError(f"unknown dataset {name!r}: choose from {', '.join(DATASETS)}{hint}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose from {', '.join(SPLITS)}")
    if limit is not None and int(limit) < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    if size is not None and key != "synthetic":
        raise ConfigError("size only applies to the synthetic dataset")
    shape = None
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise DataError(f"input_shape must be (C, H, W) with positive sizes, got {input_shape}")
        if shape[0] not in (1, 3):
            raise DataError(f"images must have 1 or 3 channels, got input_shape {shape}")

    if key == "synthetic":
        pool, test, classes, hflip, source = _synthetic(split, shape or (3, 32, 32), seed,
                                                        SYNTHETIC_SIZE if size is None else int(size))
        mean_std = None
    elif key == "imagefolder":
        pool, test, classes, hflip, source = _imagefolder(split, data_dir, shape or (3, 32, 32), workers)
        mean_std = None
    else:
        pool, test, classes, hflip, source = _torchvision(key, split, data_dir, download)
        mean, std = _NORMALISATION[key]
        mean_std = (mean, (std,) * len(mean))
        if shape is not None:
            native = tuple((pool if pool is not None else test)[0].shape[1:])
            if shape != native:
                raise DataError(f"{key} images are {'x'.join(map(str, native))}, not "
                                f"{'x'.join(map(str, shape))}; build the model for this input shape")

    if split == "test" and test is None:
        raise DataError(f"{key} at {source} has no test split: use split 'val' (a seeded part of "
                        "the training images) or 'all' (every image)")
    if mean_std is None:
        # Folders and synthetic data: statistics of the training pool (or of the test images
        # when only those were loaded), rounded so that they print and store compactly.
        ref = pool if pool is not None else test
        mean_std = _statistics(ref[0])

    if split == "test":
        images, labels = test
    else:
        images, labels = pool
        if split != "all":
            n_val = resolve_val_split(val_split, len(labels))
            train_idx, val_idx = split_indices(len(labels), n_val, seed)
            idx = train_idx if split == "train" else val_idx
            images, labels = images[idx], labels[idx]
    if limit is not None and int(limit) < len(labels):
        keep = subset_indices(len(labels), int(limit), seed)
        images, labels = images[keep], labels[keep]
    if len(labels) == 0:
        what = "validation split is empty (val_split=0)" if split == "val" else f"{split} split has no images"
        raise DataError(f"{key}: the {what}")
    ds = ImageDataset(key, split, images, labels, classes, mean_std[0], mean_std[1], hflip=hflip, source=source)
    ds.val_split = None if split in ("test", "all") else resolve_val_split(val_split, len(pool[1]))
    ds.seed = int(seed)
    return ds


# ---- a checkpoint's data ------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckpointData:
    """How to rebuild the data of a checkpoint: the :func:`load_dataset` arguments, and what
    training recorded about the split (see :func:`checkpoint_data_spec`).

    ``recorded`` is True when ``name`` is the dataset the checkpoint was trained on (only then do
    its seed, validation split, synthetic size and image folder apply). ``recorded_fingerprint``
    is the fingerprint training stored for this split, of the subset of ``recorded_limit`` images
    when training used one; None when nothing comparable was stored.
    """

    name: str
    split: str
    seed: int
    val_split: int | float | None
    size: int | None
    data_dir: str | None
    input_shape: tuple[int, ...] | None
    recorded: bool
    recorded_fingerprint: str | None = None
    recorded_limit: int | None = None


def _metadata(source) -> dict:
    meta = source if isinstance(source, dict) else getattr(source, "checkpoint_metadata", None)
    return meta if isinstance(meta, dict) else {}


def _recorded(meta: dict, key: str):
    """A value recorded in checkpoint metadata: at the top level (a training checkpoint), else in
    its training ``config`` (an export keeps only the config)."""
    if meta.get(key) is not None:
        return meta[key]
    config = meta.get("config")
    if isinstance(config, dict):
        for section in (config, config.get("data")):
            if isinstance(section, dict) and section.get(key) is not None:
                return section[key]
    return None


def _recorded_int(meta: dict, key: str, minimum: int | None = None) -> int | None:
    value = _recorded(meta, key)
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole or (minimum is not None and value < minimum):
        raise CheckpointError(f"the checkpoint records {key}={value!r}, not a whole number"
                              + (f" >= {minimum}" if minimum is not None else ""))
    return int(value)


def recorded_dataset(source) -> str | None:
    """The name of the dataset a checkpoint (a model with ``checkpoint_metadata``, or the metadata
    itself) was trained on, or None."""
    name = _recorded(_metadata(source), "dataset")
    if isinstance(name, dict):  # a dataset description rather than a bare name
        name = name.get("name")
    return str(name) if name else None


def checkpoint_data_spec(source, split: str = "val", *, dataset: str | None = None,
                         data_dir: str | os.PathLike | None = None, val_split: float | int | None = None,
                         seed: int | None = None, input_shape: Sequence[int] | None = None) -> CheckpointData:
    """Resolve (without loading anything) the data that rebuilds ``split`` of a checkpoint's
    dataset exactly as training split it; arguments that are not None override the recorded ones.

    ``source`` is a loaded model (its ``checkpoint_metadata`` and ``input_shape``) or the metadata
    dict. Recorded by :func:`certify.train.train`: ``dataset``, ``data_seed`` (the split and
    synthetic images; the training ``seed`` is the initialisation's and never splits data),
    ``val_split`` (the resolved count), ``synthetic_size``, ``data_dir`` (used for image folders,
    whose path is their identity), and the fingerprints of the train and validation splits.
    The recorded parameters apply only to the recorded dataset; another ``dataset`` gets the
    defaults (seed 0, the default validation split).
    """
    meta = _metadata(source)
    recorded_name = recorded_dataset(meta)
    name = dataset or recorded_name
    if not name:
        raise ConfigError("the checkpoint records no dataset; pass dataset= (--dataset NAME)")
    key = canonical_name(name)
    same = recorded_name is not None and key == canonical_name(recorded_name)
    if seed is None:
        seed = (_recorded_int(meta, "data_seed") if same else None) or 0
    if val_split is None and same and split in ("train", "val"):
        recorded_split = _recorded(meta, "val_split")
        if recorded_split is not None:
            if isinstance(recorded_split, bool) or not isinstance(recorded_split, (int, float)) \
                    or not 0 <= recorded_split < float("inf"):
                raise CheckpointError(f"the checkpoint records val_split={recorded_split!r}, not a count or fraction")
            val_split = recorded_split
    if isinstance(val_split, float) and val_split.is_integer():
        val_split = int(val_split)
    size = _recorded_int(meta, "synthetic_size", minimum=1) if same and key == "synthetic" else None
    if data_dir is None and same and key == "imagefolder":
        data_dir = _recorded(meta, "data_dir")
    if input_shape is None and getattr(source, "input_shape", None) is not None:
        input_shape = source.input_shape
    fingerprint = limit = None
    if same and split in ("train", "val"):
        fp_key, limit_key = ("val_fingerprint", "val_limit") if split == "val" else ("dataset_fingerprint", "limit")
        fingerprint = _recorded(meta, fp_key)
        fingerprint = fingerprint if isinstance(fingerprint, str) else None
        limit = _recorded_int(meta, limit_key, minimum=1)
    return CheckpointData(name=key, split=split, seed=int(seed), val_split=val_split, size=size,
                          data_dir=None if data_dir is None else str(data_dir),
                          input_shape=None if input_shape is None else tuple(int(s) for s in input_shape),
                          recorded=same, recorded_fingerprint=fingerprint, recorded_limit=limit)


def dataset_for_checkpoint(source, split: str = "val", *, dataset: str | None = None,
                           data_dir: str | os.PathLike | None = None, download: bool = False,
                           val_split: float | int | None = None, seed: int | None = None,
                           limit: int | None = None, input_shape: Sequence[int] | None = None) -> ImageDataset:
    """``split`` of the dataset a checkpoint was trained on, split exactly as training split it:
    the one way every command (certify, attack, demo) finds a checkpoint's images.

    Resolution as in :func:`checkpoint_data_spec` (arguments that are not None override the
    checkpoint's). The full split is compared with the fingerprint training recorded:
    ``ds.matches_training`` is True (the same images), False (other images: an override, or
    other data on disk) or None (nothing recorded to compare). Then ``limit`` keeps a seeded
    subset (:func:`subset_indices`), the same in every command. For a model, the images must
    fit its input shape and classes. ``ds.spec`` is the :class:`CheckpointData` used.
    """
    spec = checkpoint_data_spec(source, split, dataset=dataset, data_dir=data_dir, val_split=val_split,
                                seed=seed, input_shape=input_shape)
    extra = {} if spec.size is None else {"size": spec.size}
    ds = load_dataset(spec.name, split, data_dir=spec.data_dir, download=download, val_split=spec.val_split,
                      seed=spec.seed, input_shape=spec.input_shape, **extra)
    matches = None
    if spec.recorded_fingerprint is not None and isinstance(ds, ImageDataset):
        seen = ds
        if spec.recorded_limit is not None and spec.recorded_limit < len(ds):
            seen = ds.subset(subset_indices(len(ds), spec.recorded_limit, spec.seed))
        matches = seen.fingerprint == spec.recorded_fingerprint
    if spec.input_shape is not None and hasattr(ds, "check_shape"):
        ds.check_shape(spec.input_shape)
    num_classes = getattr(source, "num_classes", None)
    if num_classes is not None and getattr(ds, "num_classes", 0) > num_classes:
        raise DataError(f"the {ds.name} dataset has {ds.num_classes} classes but the model has {num_classes}")
    if limit is not None and isinstance(ds, ImageDataset) and int(limit) < len(ds):
        ds = ds.subset(subset_indices(len(ds), int(limit), spec.seed))
    ds.spec, ds.matches_training = spec, matches
    return ds


def _statistics(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images[: 20000].to(torch.float64) / 255
    if x.numel() == 0:
        raise DataError("no images to compute the normalisation from")
    mean = x.mean(dim=(0, 2, 3))
    std = float((x - mean.view(1, -1, 1, 1)).square().mean().sqrt())
    std = max(round(std, 4), 0.05)  # a floor keeps 1/std (the bound's input factor) moderate
    return tuple(round(float(m), 4) for m in mean), (std,) * x.shape[1]


def _fingerprint(name: str, split: str, images: torch.Tensor, labels: torch.Tensor,
                 class_names: Sequence[str]) -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{name}|{split}|{list(images.shape)}|{'/'.join(class_names)}".encode())
    h.update(images.numpy().tobytes())
    h.update(labels.numpy().tobytes())
    return h.hexdigest()


# ---- torchvision datasets -----------------------------------------------------------------------

_TV_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python",
               "mnist": "MNIST/raw", "fashion-mnist": "FashionMNIST/raw"}


def _missing(key: str, root: Path, what: str) -> DataError:
    return DataError(f"{key} not found in {root} ({what}); pass --download (download=True) to fetch "
                     f"it, or --data-dir (data_dir=) to point at a folder holding {_TV_FOLDERS[key]}/")


def _torchvision(key: str, split: str, data_dir, download: bool):
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if root.exists() and not root.is_dir():
        raise DataError(f"--data-dir {root} is not a folder")
    if download:
        _download(key, root)
    want_pool, want_test = split != "test", split == "test"
    if key in ("cifar10", "cifar100"):
        pool, test, classes = _read_cifar(key, root, want_pool, want_test)
        hflip = True
    else:
        pool, test, classes = _read_mnist(key, root, want_pool, want_test)
        hflip = key == "fashion-mnist"  # mirrored digits are other glyphs; mirrored clothes are clothes
    return pool, test, classes, hflip, str(root)


def _torchvision_class(key: str):
    import torchvision.datasets as tvd

    return {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "mnist": tvd.MNIST,
            "fashion-mnist": tvd.FashionMNIST}[key]


def _download(key: str, root: Path) -> None:
    """Fetch and verify (md5) the official files with torchvision; lipcert then reads them."""
    try:
        cls = _torchvision_class(key)
        root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as e:  # URLError, OSError, RuntimeError: no network, bad checksum, ...
        msg = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"could not download {key} into {root}: {msg}") from None


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR's python batches (dicts, lists, bytes and numpy arrays) and nothing else:
    a pickle that names any other callable is refused, so a tampered file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: not a readable CIFAR batch ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a CIFAR batch (expected a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in data.items()}


def _cifar_arrays(path: Path, label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    d = _unpickle(path)
    if "data" not in d or label_key not in d:
        raise DataError(f"{path}: a CIFAR batch needs 'data' and '{label_key}' entries")
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise DataError(f"{path}: expected N x 3072 pixels and N labels, got {data.shape} and {labels.shape}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels.copy())


def _read_cifar(key: str, root: Path, want_pool: bool, want_test: bool):
    folder = root / _TV_FOLDERS[key]
    if key == "cifar10":
        pool_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        test_files, meta_file, label_key, names_key = [folder / "test_batch"], folder / "batches.meta", "labels", "label_names"
    else:
        pool_files, test_files = [folder / "train"], [folder / "test"]
        meta_file, label_key, names_key = folder / "meta", "fine_labels", "fine_label_names"
    needed = (pool_files if want_pool else []) + (test_files if want_test else [])
    absent = [p.name for p in needed if not p.is_file()]
    if absent:
        raise _missing(key, root, f"missing {folder.name}/{absent[0]}")

    def read(files):
        parts = [_cifar_arrays(p, label_key) for p in files]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    if meta_file.is_file():
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in _unpickle(meta_file).get(names_key, [])]
    else:
        classes = []
    n_classes = 10 if key == "cifar10" else 100
    if len(classes) != n_classes:
        classes = list(CIFAR10_CLASSES) if key == "cifar10" else [str(i) for i in range(100)]
    return (read(pool_files) if want_pool else None), (read(test_files) if want_test else None), classes


_MNIST_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_idx(path: Path, ndim: int) -> torch.Tensor:
    """An idx file (the MNIST format: big-endian magic 0x0000 08 ndim, sizes, uint8 data), plain
    or gzipped."""
    import gzip

    if not path.is_file() and path.with_name(path.name + ".gz").is_file():
        path = path.with_name(path.name + ".gz")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({' '.join(str(e).split())})") from None
    if len(raw) < 4 + 4 * ndim or raw[:2] != b"\0\0" or raw[2] != 0x08 or raw[3] != ndim:
        raise DataError(f"{path}: not an idx file of uint8 with {ndim} dimension(s)")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    count = 1
    for d in dims:
        count *= d
    body = raw[4 + 4 * ndim:]
    if len(body) != count:
        raise DataError(f"{path}: header says {dims} ({count} bytes) but the file holds {len(body)}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).view(*dims)


def _read_mnist(key: str, root: Path, want_pool: bool, want_test: bool):
    # torchvision keeps the decompressed idx files in <root>/MNIST/raw (FashionMNIST/raw).
    folder = root / _TV_FOLDERS[key]

    def read(train: bool):
        img_name, lab_name = _MNIST_FILES[train]
        for name in (img_name, lab_name):
            if not (folder / name).is_file() and not (folder / (name + ".gz")).is_file():
                raise _missing(key, root, f"missing {_TV_FOLDERS[key]}/{name}")
        images, labels = _read_idx(folder / img_name, 3), _read_idx(folder / lab_name, 1)
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"{folder}: {images.shape[0]} images but {labels.shape[0]} labels")
        return images.unsqueeze(1).contiguous(), labels.to(torch.int64)

    classes = list(MNIST_CLASSES if key == "mnist" else FASHION_CLASSES)
    return (read(True) if want_pool else None), (read(False) if want_test else None), classes


# ---- image folders ------------------------------------------------------------------------------

def _class_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _imagefolder(split: str, data_dir, shape: tuple[int, int, int], workers: int):
    if data_dir is None:
        raise DataError("the imagefolder dataset needs --data-dir (data_dir=): a folder of class subfolders")
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise DataError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"image folder {root} is not a folder")
    # A folder with train/ and test/ (or val/) subfolders that themselves hold class folders is a
    # split layout; otherwise every subfolder is a class and the whole folder is the training pool.
    train_dir = root / "train"
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir() and _class_dirs(root / n)), None)
    split_layout = train_dir.is_dir() and bool(_class_dirs(train_dir)) and test_dir is not None
    pool_dir = train_dir if split_layout else root
    classes = [p.name for p in _class_dirs(pool_dir)]
    if not classes:
        raise DataError(f"image folder {pool_dir} has no class subfolders (expected {pool_dir}/<class>/<image>)")
    pool = test = None
    if split == "test":
        if split_layout:
            test_classes = [p.name for p in _class_dirs(test_dir)]
            unknown = sorted(set(test_classes) - set(classes))
            if unknown:
                raise DataError(f"{test_dir} has classes not in {train_dir}: {', '.join(unknown[:5])}")
            test = _read_folder(test_dir, classes, shape, workers)
    else:
        pool = _read_folder(pool_dir, classes, shape, workers)
    return pool, test, classes, True, str(root)


_FOLDER_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _read_folder(folder: Path, classes: list[str], shape, workers: int):
    """Decode every image of a class-folder tree once per process: the train and val splits (and
    a second ``load_dataset`` call) reuse the same uint8 tensors. The cache key includes every
    file's size and modification time, so a changed folder is decoded again."""
    files = _list_images(folder, classes)
    key = (str(folder.resolve()), tuple(classes), tuple(shape),
           hashlib.blake2b(repr([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p, _ in files]).encode(),
                           digest_size=16).hexdigest())
    if key not in _FOLDER_CACHE:
        _FOLDER_CACHE.clear()  # keep one folder: a CIFAR-size pool is 150 MB
        _FOLDER_CACHE[key] = _decode_folder(files, shape, workers)
    return _FOLDER_CACHE[key]


def _list_images(folder: Path, classes: list[str]) -> list[tuple[Path, int]]:
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        d = folder / name
        if d.is_dir():
            files += [(p, label) for p in sorted(d.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not files:
        raise DataError(f"image folder {folder} has no images ({', '.join(IMAGE_SUFFIXES[:3])}, ...) in its class folders")
    return files


def _decode_folder(files: list[tuple[Path, int]], shape, workers: int):
    images = torch.empty((len(files), *shape), dtype=torch.uint8)

    def decode(i: int) -> None:
        images[i] = _decode_image(files[i][0], shape)

    if workers and workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=int(workers)) as ex:  # PIL releases the GIL while decoding
            list(ex.map(decode, range(len(files))))
    else:
        for i in range(len(files)):
            decode(i)
    labels = torch.tensor([lab for _, lab in files], dtype=torch.int64)
    return images, labels


def _decode_image(path: Path, shape) -> torch.Tensor:
    """Decode, convert to RGB or grayscale, resize the shorter side and centre-crop to (H, W)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    c, h, w = shape
    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if c == 3 else "L")
            if im.size != (w, h):
                scale = max(w / im.width, h / im.height)
                nw, nh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
                im = im.resize((nw, nh), Image.BILINEAR)
                left, top = (nw - w) // 2, (nh - h) // 2
                im = im.crop((left, top, left + w, top + h))
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"{path}: cannot decode image ({' '.join(str(e).split())})") from None
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)


# ---- synthetic ----------------------------------------------------------------------------------

def _synthetic(split: str, shape, seed: int, size: int):
    if size < 10:
        raise ConfigError(f"the synthetic dataset needs at least 10 images, got size={size}")
    if shape[1] < 8 or shape[2] < 8:
        raise DataError(f"synthetic images need at least 8x8 pixels, got {shape}")
    pool = test = None
    if split == "test":
        # An independent stream: the test images are fresh draws, never in the pool.
        test = make_synthetic(max(size // 5, 10), shape, seed=int(seed) * 1_000_003 + 7_919)
    else:
        pool = make_synthetic(size, shape, seed=int(seed))
    return pool, test, list(SYNTHETIC_CLASSES), True, f"synthetic(size={size}, seed={seed})"


def make_synthetic(n: int, shape: Sequence[int] = (3, 32, 32), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` procedural images (uint8) and labels in 10 balanced classes, deterministic by seed.

    Classes (all symmetric under a horizontal flip, so flips are a valid augmentation):
    horizontal stripes, vertical stripes, checkerboard, disk, ring, square, plus, diagonal cross,
    triangle, grid of dots. Each image draws its own position, size, stripe period and phase,
    foreground/background colours (brightness contrast 0.35-0.6) and Gaussian pixel noise.
    """
    c, h, w = (int(s) for s in shape)
    g = torch.Generator().manual_seed(int(seed))
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=g)]

    def u(lo, hi, *size):
        return lo + (hi - lo) * torch.rand(n, *size, generator=g)

    side = float(min(h, w))
    yy = torch.arange(h, dtype=torch.float32).view(1, h, 1) + 0.5
    xx = torch.arange(w, dtype=torch.float32).view(1, 1, w) + 0.5
    cy = (h / 2 + u(-0.15, 0.15) * h).view(n, 1, 1)
    cx = (w / 2 + u(-0.15, 0.15) * w).view(n, 1, 1)
    s = (u(0.2, 0.32) * side).view(n, 1, 1)  # shape radius
    period = (u(0.14, 0.25) * side).view(n, 1, 1)
    ph1, ph2 = u(0, 6.2832).view(n, 1, 1), u(0, 6.2832).view(n, 1, 1)
    two_pi = 6.283185307179586
    mask = torch.zeros(n, h, w, dtype=torch.bool)
    for k in range(10):
        sel = (labels == k).nonzero().flatten()
        if len(sel):
            mask[sel] = _shape_mask(k, yy, xx, cy[sel], cx[sel], s[sel], two_pi / period[sel], ph1[sel], ph2[sel])
    bg_lum = u(0.15, 0.85)
    delta = u(0.35, 0.6) * torch.where(bg_lum > 0.5, -1.0, 1.0)
    fg_lum = (bg_lum + delta).clamp(0, 1)
    tint_bg, tint_fg = u(-0.15, 0.15, c), u(-0.15, 0.15, c)
    bg = (bg_lum[:, None] + tint_bg).view(n, c, 1, 1)
    fg = (fg_lum[:, None] + tint_fg).view(n, c, 1, 1)
    img = torch.where(mask[:, None], fg, bg) + 0.04 * torch.randn(n, c, h, w, generator=g)
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels.to(torch.int64)


def _shape_mask(k: int, yy, xx, cy, cx, s, freq, ph1, ph2) -> torch.Tensor:
    """The foreground mask of class ``k`` for a group of images (parameters of shape (m, 1, 1))."""
    dy, dx = yy - cy, xx - cx
    t = 0.3 * s  # bar half-thickness
    if k == 0:
        return (torch.sin(freq * yy + ph1) > 0).expand(-1, yy.shape[1], xx.shape[2])
    if k == 1:
        return (torch.sin(freq * xx + ph1) > 0).expand(-1, yy.shape[1], xx.shape[2])
    if k == 2:
        return torch.sin(freq * xx + ph1) * torch.sin(freq * yy + ph2) > 0
    if k == 3:
        return dx.square() + dy.square() < s.square()
    if k == 4:
        return ((dx.square() + dy.square()).sqrt() - s).abs() < 0.3 * s
    if k == 5:
        return torch.maximum(dx.abs(), dy.abs()) < 0.8 * s
    if k == 6:
        return ((dx.abs() < t) & (dy.abs() < s)) | ((dy.abs() < t) & (dx.abs() < s))
    if k == 7:
        a, b = (dx - dy).abs(), (dx + dy).abs()
        return ((a < 1.4 * t) & (b < 1.4 * s)) | ((b < 1.4 * t) & (a < 1.4 * s))
    if k == 8:
        return (dy < 0.7 * s) & (dy > -s) & (dx.abs() < 0.6 * (dy + s))
    return (torch.sin(freq * xx + ph1) > 0.6) & (torch.sin(freq * yy + ph2) > 0.6)
