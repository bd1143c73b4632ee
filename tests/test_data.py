"""Fashion-MNIST loader on small IDX files written by the tests (the real parsing code runs)."""
import gzip

import numpy as np
import pytest

from trident.training.data import CLASS_NAMES, DatasetError, load_fashion_mnist, read_idx, write_idx


def _write_split(d, n=20, gz=True, split="train"):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    stem_i, stem_l = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte") if split == "train" else \
        ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    ext = ".gz" if gz else ""
    write_idx(d / (stem_i + ext), images)
    write_idx(d / (stem_l + ext), labels)
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_loader_returns_exact_pixels_and_labels_when_idx_files_are_valid(tmp_path, gz):
    images, labels = _write_split(tmp_path, gz=gz)
    ds = load_fashion_mnist("train", tmp_path)
    assert ds.images.dtype == np.uint8 and ds.images.shape == (20, 28, 28)
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels.astype(np.int64))
    assert ds.class_names == CLASS_NAMES and len(CLASS_NAMES) == 10


def test_loader_reads_directory_from_env_when_no_argument(tmp_path, monkeypatch):
    _write_split(tmp_path, split="test")
    monkeypatch.setenv("TRIDENT_DATA_DIR", str(tmp_path))
    assert len(load_fashion_mnist("test")) == 20


def test_loader_limit_keeps_first_rows(tmp_path):
    images, _ = _write_split(tmp_path)
    np.testing.assert_array_equal(load_fashion_mnist("train", tmp_path, limit=5).images, images[:5])


def test_loader_error_names_directory_and_apt_package_when_directory_missing(tmp_path):
    with pytest.raises(DatasetError, match=r"does not exist.*apt-get install dataset-fashion-mnist") as e:
        load_fashion_mnist("train", tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)


def test_loader_error_names_missing_file_when_labels_absent(tmp_path):
    _write_split(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte"):
        load_fashion_mnist("train", tmp_path)


def test_read_idx_rejects_bad_magic_when_file_is_not_idx(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(DatasetError, match="not an IDX file"):
        read_idx(p)


def test_read_idx_rejects_truncated_data_when_file_is_cut(tmp_path):
    _write_split(tmp_path, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(DatasetError, match="truncated or corrupt"):
        load_fashion_mnist("train", tmp_path)


def test_read_idx_rejects_corrupt_gzip_when_stream_is_broken(tmp_path):
    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05abcde")[:-6])
    with pytest.raises(DatasetError, match="cannot read IDX file"):
        read_idx(p)


def test_loader_rejects_mismatched_counts_when_labels_fewer_than_images(tmp_path):
    _write_split(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    with pytest.raises(DatasetError, match="labels for 20 images"):
        load_fashion_mnist("train", tmp_path)


def test_loader_rejects_unknown_split():
    with pytest.raises(ValueError, match="split must be one of"):
        load_fashion_mnist("validation")
