import numpy as np
import pytest

from edgeprop.errors import BundleError
from edgeprop.storage import load_arrays, save_arrays


def test_round_trip_with_metadata(tmp_path):
    save_arrays(tmp_path / "a.npz", {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, {"step": 7, "x": [1.5]})
    arrays, meta = load_arrays(tmp_path / "a.npz")
    np.testing.assert_array_equal(arrays["w"], np.arange(6).reshape(2, 3))
    assert meta == {"step": 7, "x": [1.5]}


def test_a_killed_writers_temporary_file_is_cleaned_up(tmp_path):
    stale = tmp_path / ".a.npz.k3j2.tmp"
    stale.write_bytes(b"half a checkpoint")
    save_arrays(tmp_path / "a.npz", {"w": np.zeros(2)})
    assert not stale.exists() and (tmp_path / "a.npz").exists()


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    save_arrays(tmp_path / "a.npz", {"w": np.ones(3)})
    before = (tmp_path / "a.npz").read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("edgeprop.storage.os.fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_arrays(tmp_path / "a.npz", {"w": np.zeros(3)})
    assert (tmp_path / "a.npz").read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))


def test_object_arrays_are_refused(tmp_path):
    np.savez(tmp_path / "evil.npz", w=np.array([{"a": 1}], dtype=object))
    with pytest.raises(BundleError, match="holds Python objects"):
        load_arrays(tmp_path / "evil.npz")
