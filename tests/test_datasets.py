"""--data sources and the checks that run before any training work."""
import gzip

import numpy as np
import pytest

from edgeprop import datasets
from edgeprop.errors import DataError


def test_digits_is_sklearns_set_with_a_fixed_stratified_split():
    sklearn = pytest.importorskip("sklearn.datasets")
    ref = sklearn.load_digits()
    train, test = datasets.load("digits", "train"), datasets.load("digits", "test")
    assert len(train) + len(test) == 1797 and len(test) == 450
    np.testing.assert_array_equal(np.sort(np.concatenate([train.y, test.y])), np.sort(ref.target))
    tr_idx, te_idx = datasets.stratified_split(ref.target)
    np.testing.assert_array_equal(train.x, ref.data[tr_idx])
    np.testing.assert_array_equal(test.y, ref.target[te_idx])
    # Stratified: every class has ~25% of its samples in test.
    for c in range(10):
        share = (test.y == c).sum() / (ref.target == c).sum()
        assert abs(share - 0.25) < 0.01
    assert datasets.load("digits", "test").y.tolist() == test.y.tolist()  # fixed


def test_npz_with_one_or_both_splits(tmp_path):
    x, y = np.random.rand(20, 4).astype(np.float32), np.arange(20) % 3
    np.savez(tmp_path / "one.npz", x=x, y=y)
    np.savez(tmp_path / "both.npz", x_train=x, y_train=y, x_test=x[:5], y_test=y[:5])
    assert len(datasets.load(str(tmp_path / "one.npz"), "test")) == 20
    assert len(datasets.load(str(tmp_path / "both.npz"), "test")) == 5
    np.savez(tmp_path / "bad.npz", a=x)
    with pytest.raises(DataError, match="expected arrays x and y"):
        datasets.load(str(tmp_path / "bad.npz"), "train")


def _write_idx(path, array, compress):
    codes = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + np.array(array.shape, ">u4").tobytes()
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    (gzip.open if compress else open)(path, "wb").write(raw)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_folder_in_mnist_layout(tmp_path, compress):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 255, (30, 28, 28), dtype=np.uint8), rng.integers(0, 10, 30).astype(np.uint8)
    ext = ".gz" if compress else ""
    for prefix, n in (("train", 30), ("t10k", 10)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{ext}", images[:n], compress)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{ext}", labels[:n], compress)
    train = datasets.load(str(tmp_path), "train")
    assert train.x.shape == (30, 28, 28) and train.x.dtype == np.uint8  # kept compact
    np.testing.assert_array_equal(train.x, images)
    np.testing.assert_array_equal(datasets.load(str(tmp_path), "test").y, labels[:10])
    datasets.check(train, [784], 10)  # images are flattened to the model's features


def test_truncated_idx_file_is_named(tmp_path):
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 2, 2), np.uint8), False)
    data = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(data[:-3])
    with pytest.raises(DataError, match="header says shape"):
        datasets.read_idx(tmp_path / "train-images-idx3-ubyte")


def _ds(x, y):
    return datasets.Dataset(np.asarray(x, np.float32), np.asarray(y), "test-data")


@pytest.mark.parametrize("x, y, message", [
    (np.zeros((4, 5)), [0, 1, 2, 3], "5 features .* expects 64"),
    (np.full((4, 64), np.nan), [0, 1, 2, 3], "NaN"),
    (np.where(np.eye(4, 64) > 0, np.inf, 0), [0, 1, 2, 3], "inf"),
    (np.zeros((4, 64)), [0, 1, 2, 10], "label 10 in sample 3 is outside"),
    (np.zeros((4, 64)), [0, -1, 2, 3], "label -1"),
])
def test_bad_data_is_rejected_with_the_reason(x, y, message):
    with pytest.raises(DataError, match=message):
        datasets.check(_ds(x, y), [64], 10)


def test_missing_source():
    with pytest.raises(DataError, match="no such file"):
        datasets.load("/nonexistent/data.npz", "train")


def test_non_numeric_samples_are_rejected(tmp_path):
    np.savez(tmp_path / "text.npz", x=np.array([["a", "b"]] * 4), y=np.arange(4))
    with pytest.raises(DataError, match="numeric array"):
        datasets.load(str(tmp_path / "text.npz"), "train")
