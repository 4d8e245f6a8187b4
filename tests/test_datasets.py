"""CIFAR-100 and STL-10 readers, on files generated in the exact formats of their releases."""

from __future__ import annotations

import io
import json
import pickle
import urllib.error

import numpy as np
import pytest
import torch

from selfsup import config, data, datasets, stl10
from selfsup.cli import main
from selfsup.errors import DataError
from tests.helpers import STL10_CLASSES, stl10_bin, stl10_images

# --- CIFAR-100 --------------------------------------------------------------------------------


def test_cifar100_fine_and_coarse_labels(cifar100_dir):
    d = datasets.load_dataset("cifar100", cifar100_dir, download=False)
    assert d.name == "cifar100" and d.train_x.shape == (60, 3, 32, 32)
    assert d.test_x.shape == (20, 3, 32, 32) and d.train_x.dtype == torch.uint8
    assert len(d.classes) == 100 and d.classes[7] == "fine07"
    assert d.train_y.tolist()[:3] == [0, 1, 2] and d.train_y.tolist()[59] == 59
    # Image 59 has fine label 59, coarse 11: row 11 is white (the fixture's marker).
    assert (d.train_x[59, :, 11] == 255).all()
    c = datasets.load_dataset("cifar100", cifar100_dir, download=False, cifar100_labels="coarse")
    assert len(c.classes) == 20 and c.classes[11] == "coarse11"
    assert torch.equal(c.train_y, d.train_y // 5) and torch.equal(c.train_x, d.train_x)


def test_cifar100_archive_matches_folder(tmp_path, monkeypatch):
    """The archive alone (in a folder of its own) gives the extracted files' data."""
    from tests.helpers import cifar100_files, release_archive, release_folder

    files = cifar100_files()
    (tmp_path / "a").mkdir()
    (tmp_path / "f").mkdir()
    archive = release_archive(tmp_path / "a", monkeypatch, data, "CIFAR100_MD5",
                              data.CIFAR100_ARCHIVE, data.CIFAR100_DIR, files)
    folder = release_folder(tmp_path / "f", monkeypatch, data, "CIFAR100_MD5",
                            data.CIFAR100_DIR, files)
    a = data.load_cifar100(archive, download=False)
    b = data.load_cifar100(folder, download=False)
    assert [p.name for p in archive.iterdir()] == [data.CIFAR100_ARCHIVE]
    for k in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k


def test_cifar100_wrong_md5_names_file_and_digests(cifar100_dir):
    f = cifar100_dir / data.CIFAR100_DIR / "train"
    expected = data.CIFAR100_MD5["train"]
    f.write_bytes(f.read_bytes()[:-1] + b"\x01")
    with pytest.raises(DataError) as e:
        data.load_cifar100(cifar100_dir, download=False)
    assert "train" in str(e.value) and expected in str(e.value) and data.md5_of(f) in str(e.value)


def test_cifar100_published_digests_are_the_release_s():
    assert data.CIFAR100_MD5 == {
        "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "meta": "7973b15100ade9c7d40fb424638fde48",
    }


def test_cifar100_truncated_archive_is_refused(cifar100_archive):
    f = cifar100_archive / data.CIFAR100_ARCHIVE
    f.write_bytes(f.read_bytes()[:300])
    with pytest.raises(DataError, match="cifar-100-python.tar.gz is damaged or incomplete"):
        data.load_cifar100(cifar100_archive, download=False)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch selfsup-pwned",))


def test_cifar100_crafted_pickle_is_refused(cifar100_dir, monkeypatch):
    f = cifar100_dir / data.CIFAR100_DIR / "test"
    f.write_bytes(pickle.dumps({b"data": _Evil(), b"fine_labels": [0]}, protocol=2))
    monkeypatch.setattr(data, "CIFAR100_MD5", {**data.CIFAR100_MD5, "test": data.md5_of(f)})
    monkeypatch.chdir(cifar100_dir)
    with pytest.raises(DataError, match="refused global"):
        data.load_cifar100(cifar100_dir, download=False)
    assert not (cifar100_dir / "selfsup-pwned").exists()


def test_cifar100_labels_beyond_the_class_names_are_refused(cifar100_dir, monkeypatch):
    f = cifar100_dir / data.CIFAR100_DIR / "meta"
    f.write_bytes(pickle.dumps({b"fine_label_names": [b"a", b"b"],
                                b"coarse_label_names": [b"c"]}, protocol=2))
    monkeypatch.setattr(data, "CIFAR100_MD5", {**data.CIFAR100_MD5, "meta": data.md5_of(f)})
    with pytest.raises(DataError, match="labels outside 0..1"):
        data.load_cifar100(cifar100_dir, download=False)


def test_cifar100_missing_offline_message(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as e:
        data.load_cifar100(tmp_path / "nowhere")
    msg = str(e.value)
    assert "CIFAR-100 not found" in msg and "cifar-100-python.tar.gz" in msg
    assert data.CIFAR100_URL in msg and "eb9058c3a382ffc7106e4002c42a8d85" in msg


def test_cifar100_download_then_verify(tmp_path, monkeypatch, cifar100_archive):
    blob = (cifar100_archive / data.CIFAR100_ARCHIVE).read_bytes()
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(blob))
    d = data.load_cifar100(tmp_path / "fresh")
    assert len(d.train_x) == 60 and (tmp_path / "fresh" / data.CIFAR100_ARCHIVE).is_file()


def test_cifar_resized_on_request(cifar100_dir):
    d = data.load_cifar100(cifar100_dir, download=False, image_size=16)
    assert d.train_x.shape == (60, 3, 16, 16) and d.test_x.shape == (20, 3, 16, 16)
    # Image 59's white row 11 of 32 becomes a bright row near 5.5 of 16.
    assert d.train_x[59, :, 5:7].float().mean() > 150


# --- STL-10 -----------------------------------------------------------------------------------


def test_stl10_reads_the_release_layout(stl10_dir):
    d = datasets.load_dataset("stl10", stl10_dir, download=False)
    assert d.name == "stl10" and d.classes == STL10_CLASSES
    assert d.train_x.shape == (40, 3, 96, 96) and d.test_x.shape == (20, 3, 96, 96)
    # Column-major on disk: the marker written at (row 1, column 2) is read back there.
    assert torch.equal(d.train_x, torch.from_numpy(stl10_images(40, 0)))
    assert d.train_x[0, 0, 1, 2] == 200 and d.train_x[0, 0, 2, 1] == 0
    assert d.train_y.tolist()[:11] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0]  # 1-based on disk
    (u,) = d.unlabeled_x
    assert torch.equal(u, torch.from_numpy(stl10_images(30, 2)))
    assert not u.is_contiguous()  # a view of the memory-mapped file, not a copy
    assert d.pretrain_size == 70 and d.labeled


def test_stl10_published_digests_are_the_release_s():
    assert stl10.STL10_MD5 == {
        "stl10_binary.tar.gz": "91f7769df0f17e558f3565bffb0c7dfb",
        "train_X.bin": "918c2871b30a85fa023e0c44e0bee87f",
        "train_y.bin": "5a34089d4802c674881badbb80307741",
        "test_X.bin": "7f263ba9f9e0b06b93213547f721ac82",
        "test_y.bin": "36f9794fa4beb8a2c72628de14fa638e",
        "unlabeled_X.bin": "5242ba1fed5e4be9e1e742405eb56ca4",
    }


def test_stl10_without_unlabeled_needs_no_unlabeled_file(stl10_dir):
    (stl10_dir / stl10.STL10_DIR / "unlabeled_X.bin").unlink()
    d = datasets.load_dataset("stl10", stl10_dir, download=False, stl10_unlabeled=False)
    assert d.unlabeled_x == () and d.pretrain_size == 40
    with pytest.raises(DataError, match="missing unlabeled_X.bin"):
        datasets.load_dataset("stl10", stl10_dir, download=False)


def test_stl10_fold_trains_on_the_fold_and_pretrains_on_all(stl10_dir):
    d = datasets.load_dataset("stl10", stl10_dir, download=False, stl10_fold=2)
    everything = torch.from_numpy(stl10_images(40, 0))
    fold = [2, 6, 10, 14]  # line 3 of the fixture's fold_indices.txt
    assert torch.equal(d.train_x, everything[fold]) and d.train_y.tolist() == [2, 6, 0, 4]
    rest, unlabeled = d.unlabeled_x
    assert len(rest) == 36 and len(unlabeled) == 30 and d.pretrain_size == 70
    assert not any(torch.equal(rest[i], everything[f]) for i in range(36) for f in fold)


@pytest.mark.parametrize("text,expect", [
    ("1 2\n" * 9, "9 folds"),
    ("1 x\n" * 10, "not a list of integers"),
    ("1 99\n" * 10, "distinct indices in 0..39"),
    ("3 3\n" * 10, "distinct indices"),
])
def test_stl10_damaged_fold_file(stl10_dir, text, expect):
    (stl10_dir / stl10.STL10_DIR / stl10.FOLDS).write_text(text)
    with pytest.raises(DataError, match=expect):
        datasets.load_dataset("stl10", stl10_dir, download=False, stl10_fold=0)


def test_stl10_fold_out_of_range_is_a_config_error():
    with pytest.raises(config.ConfigError, match=r"--stl10-fold must be an integer in \[-1, 9\]"):
        config.make_config(None, {"dataset": "stl10", "stl10_fold": 10})


def _patch_digest(monkeypatch, folder, name):
    monkeypatch.setattr(stl10, "STL10_MD5", {**stl10.STL10_MD5,
                                             name: data.md5_of(folder / name)})


@pytest.mark.parametrize("name,content,expect", [
    ("train_X.bin", stl10_bin(stl10_images(40, 0))[:-5], "not a whole number of 3x96x96"),
    ("test_X.bin", b"", "not a whole number"),
    ("train_y.bin", bytes(i % 10 + 1 for i in range(39)), "39 labels for 40 images"),
    ("test_y.bin", bytes([0] * 20), r"labels must be 1..10"),
    ("test_y.bin", bytes([11] * 20), r"labels must be 1..10"),
    ("class_names.txt", b"\n\n", "no class names"),
])
def test_stl10_damaged_files_give_clear_errors(stl10_dir, monkeypatch, name, content, expect):
    folder = stl10_dir / stl10.STL10_DIR
    (folder / name).write_bytes(content)
    if name in stl10.STL10_MD5:
        _patch_digest(monkeypatch, folder, name)  # the structure check, past the digest
    with pytest.raises(DataError, match=expect):
        datasets.load_dataset("stl10", stl10_dir, download=False)


def test_stl10_wrong_digest_names_file_and_digests(stl10_dir):
    f = stl10_dir / stl10.STL10_DIR / "unlabeled_X.bin"
    expected = stl10.STL10_MD5["unlabeled_X.bin"]
    raw = bytearray(f.read_bytes())
    raw[5] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(DataError) as e:
        datasets.load_dataset("stl10", stl10_dir, download=False)
    msg = str(e.value)
    assert "unlabeled_X.bin" in msg and expected in msg and data.md5_of(f) in msg


def test_stl10_archive_is_extracted_once_then_read(stl10_archive, capsys):
    a = datasets.load_dataset("stl10", stl10_archive, download=False)
    assert "extracting" in capsys.readouterr().out
    assert (stl10_archive / stl10.STL10_DIR / "unlabeled_X.bin").is_file()
    assert not list(stl10_archive.glob("*.part*"))  # nothing half-written is left
    assert torch.equal(a.train_x, torch.from_numpy(stl10_images(40, 0)))
    assert torch.equal(a.unlabeled_x[0], torch.from_numpy(stl10_images(30, 2)))
    datasets.load_dataset("stl10", stl10_archive, download=False)
    assert "extracting" not in capsys.readouterr().out


def test_stl10_archive_member_paths_are_never_followed(tmp_path, monkeypatch):
    from tests.helpers import release_archive, stl10_files

    files = {**stl10_files(), "../../escaped.txt": b"x"}  # would land in tmp_path if followed
    root = release_archive(tmp_path, monkeypatch, stl10, "STL10_MD5", stl10.STL10_ARCHIVE,
                           stl10.STL10_DIR, files)
    datasets.load_dataset("stl10", root, download=False)
    assert not list(tmp_path.rglob("escaped.txt"))


def test_stl10_truncated_archive_and_missing_message(stl10_archive, tmp_path, monkeypatch):
    f = stl10_archive / stl10.STL10_ARCHIVE
    f.write_bytes(f.read_bytes()[:500])
    with pytest.raises(DataError, match="stl10_binary.tar.gz is damaged or incomplete"):
        datasets.load_dataset("stl10", stl10_archive, download=False)

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as e:
        datasets.load_dataset("stl10", tmp_path / "nowhere")
    msg = str(e.value)
    assert "STL-10 not found" in msg and stl10.STL10_URL in msg and "download failed" in msg
    assert stl10.STL10_MD5[stl10.STL10_ARCHIVE] in msg  # the digest to check a copy against


def test_stl10_resized_on_request_keeps_every_part(stl10_dir, capsys):
    d = datasets.load_dataset("stl10", stl10_dir, download=False, image_size=32)
    assert d.train_x.shape == (40, 3, 32, 32) and d.test_x.shape == (20, 3, 32, 32)
    assert d.unlabeled_x[0].shape == (30, 3, 32, 32)
    assert "resizing 90 STL-10 images to 32x32" in capsys.readouterr().out


# --- shared pieces ------------------------------------------------------------------------------


def test_resize_images_is_close_to_pillow():
    from PIL import Image

    x = torch.from_numpy(stl10_images(3, 5))
    got = data.resize_images(x, 40)
    assert got.shape == (3, 3, 40, 40) and got.dtype == torch.uint8
    for i in range(3):
        ref = Image.fromarray(x[i].permute(1, 2, 0).numpy()).resize((40, 40), Image.BILINEAR)
        diff = np.abs(np.asarray(ref, np.float64) - got[i].permute(1, 2, 0).numpy())
        assert diff.mean() < 1.5, diff.mean()
    assert data.resize_images(x, 96) is x


def test_image_stack_indexes_like_the_concatenation():
    parts = [torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8) for n in (5, 1, 7)]
    stack, whole = data.ImageStack(parts), torch.cat(parts)
    assert len(stack) == 13 and stack.shape == whole.shape
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        idx = torch.randint(0, 13, (9,), generator=g)
        assert torch.equal(stack[idx], whole[idx])
        assert torch.equal(stack.gather(idx), whole[idx])  # the GPU's way, no read-back
    assert torch.equal(stack.gather(torch.arange(13).flip(0)), whole.flip(0))
    assert torch.equal(stack[3:11], whole[3:11]) and torch.equal(stack[12:], whole[12:])
    with pytest.raises(IndexError):
        stack[torch.tensor([13])]


def test_dataset_choices_match_the_readers():
    assert config.choices_of("dataset") == tuple(datasets.DATASETS)
    assert set(datasets.DATASETS) >= {"cifar10", "cifar100", "stl10", "digits", "folder"}


# --- the whole job ------------------------------------------------------------------------------

SMALL = ["--epochs", "2", "--batch-size", "16", "--width", "4", "--proj-hidden", "16",
         "--proj-dim", "8", "--tsne-points", "40", "--no-progress", "--view-size", "16"]


def _run(tmp_path, dataset, data_dir, *extra, name="e2e"):
    return main(["run", "--dataset", dataset, "--data-dir", str(data_dir), "--out-dir",
                 str(tmp_path / "runs"), "--name", name, *SMALL, *extra])


@pytest.mark.slow
def test_run_cifar100_whole_job(cifar100_dir, tmp_path):
    assert _run(tmp_path, "cifar100", cifar100_dir, "--cifar100-labels", "coarse") == 0
    run = tmp_path / "runs" / "e2e"
    m = json.loads((run / "metrics.json").read_text())
    assert m["dataset"] == "cifar100" and len(m["classes"]) == 20 and m["image_size"] == 32
    assert m["pretrain"]["steps"] == 2 * (60 // 16) and 0 <= m["linear_probe"]["trained"] <= 1
    assert np.load(run / "train_lbl.npy").max() < 20
    report = (run / "report.html").read_text()
    assert "cifar100, 32x32 px: 60 training images" in report
    for f in ("confusion.png", "tsne.png", "pca.png", "loss.png"):
        assert (run / f).is_file(), f


@pytest.mark.slow
def test_run_stl10_pretrains_on_the_unlabeled_images_too(stl10_dir, tmp_path):
    assert _run(tmp_path, "stl10", stl10_dir, "--image-size", "32") == 0
    run = tmp_path / "runs" / "e2e"
    m = json.loads((run / "metrics.json").read_text())
    assert m["dataset"] == "stl10" and m["image_size"] == 32 and m["pretrain_size"] == 70
    assert m["pretrain"]["steps"] == 2 * (70 // 16)  # an epoch is 40 labelled + 30 unlabeled
    assert np.load(run / "train_emb.npy").shape[0] == 40  # the probe: labelled images only
    assert np.load(run / "test_emb.npy").shape[0] == 20
    report = (run / "report.html").read_text()
    assert "stl10, 32x32 px: 40 training images (and 30 unlabeled ones for pretraining only)" \
        in report
    # The parts again, on the finished run (they need no unlabeled images).
    assert main(["evaluate", str(run)]) == 0
    # Leaving the unlabeled images out; the time budget with them.
    assert _run(tmp_path, "stl10", stl10_dir, "--no-stl10-unlabeled", name="labelled") == 0
    m = json.loads((tmp_path / "runs" / "labelled" / "metrics.json").read_text())
    assert m["pretrain"]["steps"] == 2 * (40 // 16) and m["image_size"] == 96
    assert _run(tmp_path, "stl10", stl10_dir, "--budget", "4s", "--image-size", "32",
                "--knn-every", "0", name="budget") == 0
    m = json.loads((tmp_path / "runs" / "budget" / "metrics.json").read_text())
    assert m["pretrain"]["budget"]["steps"] == m["pretrain"]["steps"] > 0
