import io
import pickle
import urllib.error

import numpy as np
import pytest
import torch

from selfsup import data
from selfsup.errors import DataError
from tests.helpers import CLASSES, write_images


def test_cifar_extracted_folder(cifar_dir):
    d = data.load_cifar10(cifar_dir, download=False)
    assert d.train_x.shape == (100, 3, 32, 32) and d.train_x.dtype == torch.uint8
    assert d.test_x.shape == (20, 3, 32, 32)
    assert d.train_y.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert d.classes == CLASSES
    # Image 3 has label 3: rows 9..11 are white in every channel.
    assert (d.train_x[3, :, 9:12] == 255).all()


def test_cifar_archive_matches_folder(tmp_path, monkeypatch):
    """The archive alone (in a folder of its own: with the extracted folder beside it, that
    one is read) gives the extracted files' data, and extracts nothing."""
    from tests.helpers import cifar_files, release_archive, release_folder

    files = cifar_files()
    (tmp_path / "a").mkdir()
    (tmp_path / "f").mkdir()
    archive = release_archive(tmp_path / "a", monkeypatch, data, "CIFAR10_MD5",
                              data.CIFAR10_ARCHIVE, data.CIFAR10_DIR, files)
    folder = release_folder(tmp_path / "f", monkeypatch, data, "CIFAR10_MD5", data.CIFAR10_DIR,
                            files)
    a = data.load_cifar10(archive, download=False)
    b = data.load_cifar10(folder, download=False)
    assert [p.name for p in archive.iterdir()] == [data.CIFAR10_ARCHIVE]
    for k in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k


def test_wrong_md5_names_file_and_digests(cifar_dir):
    f = cifar_dir / data.CIFAR10_DIR / "data_batch_3"
    expected = data.CIFAR10_MD5["data_batch_3"]
    raw = bytearray(f.read_bytes())
    raw[-10] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(DataError) as e:
        data.load_cifar10(cifar_dir, download=False)
    msg = str(e.value)
    assert "data_batch_3" in msg and expected in msg and data.md5_of(f) in msg


def test_truncated_archive_is_refused(cifar_archive):
    f = cifar_archive / data.CIFAR10_ARCHIVE
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(DataError, match="cifar-10-python.tar.gz is damaged or incomplete"):
        data.load_cifar10(cifar_archive, download=False)


def test_truncated_pickle_gives_clear_error():
    good = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, protocol=2)
    with pytest.raises(DataError, match="damaged or truncated"):
        data.safe_unpickle(good[: len(good) // 2], "x")


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch selfsup-pwned",))


def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps({b"data": _Evil(), b"labels": [0]}, protocol=2)
    with pytest.raises(DataError, match="refused"):
        data.safe_unpickle(payload, "evil")
    assert not (tmp_path / "selfsup-pwned").exists()
    # The same bytes do run code under the plain unpickler: the test would catch a regression.
    pickle.loads(payload)
    assert (tmp_path / "selfsup-pwned").exists()


def test_crafted_pickle_inside_cifar_folder(cifar_dir, monkeypatch):
    payload = pickle.dumps({b"data": _Evil(), b"labels": [0]}, protocol=2)
    f = cifar_dir / data.CIFAR10_DIR / "test_batch"
    f.write_bytes(payload)
    table = dict(data.CIFAR10_MD5, test_batch=data.md5_of(f))
    monkeypatch.setattr(data, "CIFAR10_MD5", table)
    monkeypatch.chdir(cifar_dir)
    with pytest.raises(DataError, match="refused global posix.system|refused global os.system"):
        data.load_cifar10(cifar_dir, download=False)
    assert not (cifar_dir / "selfsup-pwned").exists()


def test_missing_offline_message(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as e:
        data.load_cifar10(tmp_path / "nowhere")
    msg = str(e.value)
    assert "cifar-10-python.tar.gz" in msg and data.CIFAR10_URL in msg and "--data-dir" in msg
    assert "download failed" in msg
    assert not list((tmp_path / "nowhere").glob("*.part"))


def test_download_then_verify(tmp_path, monkeypatch, cifar_archive):
    blob = (cifar_archive / data.CIFAR10_ARCHIVE).read_bytes()
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(blob))
    # Another process downloading at the same time has its own partial file: left alone.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    other = fresh / f"{data.CIFAR10_ARCHIVE}.999999999.part"
    other.write_bytes(b"half")
    d = data.load_cifar10(fresh)
    assert len(d.train_x) == 100 and (fresh / data.CIFAR10_ARCHIVE).read_bytes() == blob
    assert other.read_bytes() == b"half"
    assert sorted(p.name for p in fresh.iterdir()) == [data.CIFAR10_ARCHIVE, other.name]


def test_incomplete_folder_names_missing_files(cifar_dir):
    (cifar_dir / data.CIFAR10_DIR / "data_batch_5").unlink()
    with pytest.raises(DataError, match="missing data_batch_5"):
        data.load_cifar10(cifar_dir, download=False)


def test_image_folder_labeled(image_folder):
    d = data.load_image_folder(image_folder)
    assert d.classes == ["cat", "dog", "emu"]
    assert d.train_x.shape == (24, 3, 12, 12) and d.test_x.shape == (9, 3, 12, 12)
    assert d.train_y.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    # Class c has channel c saturated (PNG is lossless).
    assert (d.train_x[d.train_y == 1][:, 1] == 255).all()


def test_image_folder_flat_unlabeled_mixed_sizes_and_junk(tmp_path, capsys):
    root = tmp_path / "flat"
    write_images(root, 4, size=10)
    write_images(root / "sub", 2, size=14, seed=3)
    (root / "notes.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        d = data.load_image_folder(root)
    assert d.train_y is None and not d.labeled and d.train_x.shape == (6, 3, 10, 10)
    assert "read at 10 px (their own); images of other sizes resized to it" in \
        capsys.readouterr().out


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        data.load_image_folder(tmp_path / "empty")


def test_digits():
    d = data.load_digits()
    assert d.train_x.shape == (1437, 3, 16, 16) and d.test_x.shape == (360, 3, 16, 16)
    assert d.train_x.dtype == torch.uint8 and int(d.train_x.max()) == 255
    assert sorted(set(d.test_y.tolist())) == list(range(10))


def test_channel_stats_matches_numpy():
    x = torch.randint(0, 256, (7, 3, 5, 5), dtype=torch.uint8)
    mean, std = data.channel_stats(x, chunk_pixels=3 * 3 * 25)  # chunks of 3 images
    a = x.numpy().astype(np.float64) / 255
    np.testing.assert_allclose(mean, a.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(std, a.std(axis=(0, 2, 3)), rtol=1e-6)
