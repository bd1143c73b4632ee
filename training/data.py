"""Fashion-MNIST from its standard IDX files (gzip or raw).

Default directory: /usr/share/datasets/fashion-mnist (Debian package `dataset-fashion-mnist`), overridable by
the `data_dir` argument, the `--data-dir` flag of the CLI, or the TRIDENT_DATA_DIR environment variable.
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trident.serving.errors import TridentError

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "TRIDENT_DATA_DIR"
CLASS_NAMES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_HOW_TO_GET = ("Install it with `apt-get install dataset-fashion-mnist` (Debian), or point --data-dir / "
               f"{ENV_VAR} at a folder holding the four IDX files (.gz or raw) from "
               "github.com/zalandoresearch/fashion-mnist.")
# IDX type codes (third byte of the magic number) -> numpy dtype (big-endian).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetError(TridentError):
    """The dataset is missing or malformed; the message says where we looked and how to get it."""


@dataclass(frozen=True)
class Dataset:
    images: np.ndarray  # (N, 28, 28) uint8
    labels: np.ndarray  # (N,) int64
    class_names: tuple[str, ...] = CLASS_NAMES

    def __len__(self) -> int:
        return len(self.labels)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    if data_dir is not None:
        return Path(data_dir)
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DATA_DIR)


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (magic 0x0000TTDD, big-endian dims, then data)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"cannot read IDX file {path}: {e}. {_HOW_TO_GET}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'}). {_HOW_TO_GET}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header. {_HOW_TO_GET}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetError(f"{path}: header says shape {dims} ({expected} bytes) but the file holds "
                           f"{len(raw) - header} bytes of data (truncated or corrupt). {_HOW_TO_GET}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise DatasetError(f"Fashion-MNIST file {stem}[.gz] not found in {directory}. {_HOW_TO_GET}")


def load_fashion_mnist(split: str = "train", data_dir: str | os.PathLike | None = None,
                       limit: int | None = None) -> Dataset:
    """Load a split ("train" or "test") as uint8 images (N, 28, 28) and int64 labels (N,)."""
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
    directory = resolve_data_dir(data_dir)
    if not directory.is_dir():
        raise DatasetError(f"Fashion-MNIST directory {directory} does not exist. {_HOW_TO_GET}")
    img_stem, lbl_stem = SPLIT_FILES[split]
    images = read_idx(_find(directory, img_stem))
    labels = read_idx(_find(directory, lbl_stem))
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DatasetError(f"{directory}: {img_stem} should hold uint8 images (N, 28, 28), found "
                           f"{images.dtype} {images.shape}. {_HOW_TO_GET}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DatasetError(f"{directory}: {lbl_stem} holds {labels.shape} labels for {len(images)} images. {_HOW_TO_GET}")
    if len(labels) and labels.max() >= len(CLASS_NAMES):
        raise DatasetError(f"{directory}: label {int(labels.max())} out of range 0..{len(CLASS_NAMES) - 1}. {_HOW_TO_GET}")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return Dataset(np.ascontiguousarray(images), labels.astype(np.int64))


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an IDX file (gzip if the name ends in .gz). Used by tests and to make small subsets."""
    codes = {np.dtype(v).str: k for k, v in _IDX_DTYPES.items()}
    dt = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    code = codes[np.dtype(dt).str] if np.dtype(dt).str in codes else codes[np.dtype(np.uint8).str]
    payload = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(dt).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)
