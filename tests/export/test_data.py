"""Datasets: ImageFolder scanning (corrupt files, empty classes, one class) and the bundled digits."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from PIL import Image

from export import data as datamod
from export.data import DatasetError


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_scan_finds_classes_in_sorted_order(tiny_digits):
    folder = datamod.scan_image_folder(tiny_digits / "train")
    assert folder.classes == ("0", "1", "7")
    assert len(folder.samples) == 150
    assert sorted(set(folder.targets)) == [0, 1, 2]
    assert folder.skipped == ()


def test_corrupt_and_truncated_files_are_reported_by_path_and_skipped(tiny_digits, tmp_path, caplog):
    root = _copy(tiny_digits / "train", tmp_path / "train")
    garbage = root / "1" / "garbage.png"
    garbage.write_bytes(b"this is not a png")
    good = next((root / "7").glob("*.png"))
    truncated = root / "7" / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with caplog.at_level("WARNING"):
        folder = datamod.scan_image_folder(root)
    assert {p for p, _ in folder.skipped} == {garbage, truncated}
    assert len(folder.samples) == 150
    assert str(garbage) in caplog.text and str(truncated) in caplog.text


def test_strict_fails_on_the_first_unreadable_file(tiny_digits, tmp_path):
    root = _copy(tiny_digits / "train", tmp_path / "train")
    (root / "0" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    with pytest.raises(DatasetError, match=r"bad\.jpg: unreadable image"):
        datamod.scan_image_folder(root, strict=True)


def test_empty_class_folder_is_an_error(tiny_digits, tmp_path):
    root = _copy(tiny_digits / "train", tmp_path / "train")
    (root / "9").mkdir()
    with pytest.raises(DatasetError, match=r"9: class folder has no image files"):
        datamod.scan_image_folder(root)


def test_a_class_whose_images_are_all_unreadable_is_an_error(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "ok.png")
    (tmp_path / "b" / "x.png").write_bytes(b"nope")
    with pytest.raises(DatasetError, match="every image in this class folder is unreadable"):
        datamod.scan_image_folder(tmp_path)


def test_one_class_is_an_error(tmp_path):
    (tmp_path / "only").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "only" / "x.png")
    with pytest.raises(DatasetError, match="found one class"):
        datamod.scan_image_folder(tmp_path)


def test_missing_directory_and_no_class_folders(tmp_path):
    with pytest.raises(DatasetError, match="no such dataset directory"):
        datamod.scan_image_folder(tmp_path / "absent")
    with pytest.raises(DatasetError, match="no class folders"):
        datamod.scan_image_folder(tmp_path)


def test_val_split_is_stratified_and_seeded(tiny_digits):
    a = datamod.load_splits(tiny_digits / "train", val_split=0.2, seed=3)
    b = datamod.load_splits(tiny_digits / "train", val_split=0.2, seed=3)
    c = datamod.load_splits(tiny_digits / "train", val_split=0.2, seed=4)
    assert a.val.samples == b.val.samples != c.val.samples
    assert sorted(a.val.targets) == [0] * 10 + [1] * 10 + [2] * 10
    assert not {p for p, _ in a.val.samples} & {p for p, _ in a.train.samples}


def test_a_folder_without_train_and_val_needs_val_split(tiny_digits):
    with pytest.raises(DatasetError, match="pass --val-split"):
        datamod.load_splits(tiny_digits / "train")


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.png")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.mark.slow
def test_bundled_digits_are_written_deterministically(tmp_path):
    first = datamod.write_digits(tmp_path / "a")
    second = datamod.write_digits(tmp_path / "b")
    assert _tree_digest(first) == _tree_digest(second)
    splits = datamod.load_splits(first)
    assert (len(splits.train.samples), len(splits.val.samples)) == (1500, 297)
    assert splits.train.classes == tuple(str(d) for d in range(10))
    with Image.open(splits.val.samples[0][0]) as im:
        assert (im.mode, im.size) == ("L", (32, 32))
    # A complete copy is reused as is, not rewritten.
    mtime = splits.val.samples[0][0].stat().st_mtime_ns
    datamod.write_digits(first)
    assert splits.val.samples[0][0].stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_write_digits_refuses_a_foreign_non_empty_directory(tmp_path):
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "mine.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a complete svertka digits folder"):
        datamod.write_digits(tmp_path / "digits")


def test_digit_image_is_the_source_scaled_and_upsampled():
    import numpy as np

    pixels = np.zeros((8, 8))
    pixels[2:6, 3:5] = 16  # two source pixels wide: the bilinear peak between them is exact
    image = datamod.digits_to_image(pixels)
    arr = np.asarray(image)
    assert image.size == (32, 32) and arr.max() == 255 and arr.min() == 0
    assert arr[:, :8].max() == 0  # columns far from the stroke stay black


def _folder_with_a_broken_png(root: Path) -> Path:
    """Two classes of four real 8x8 PNGs each, and ``a/broken.png`` that is not a PNG."""
    for index, cls in enumerate(("a", "b")):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            colour = (60 * index + 10 * i, 40, 200 - 50 * index)
            Image.new("RGB", (8, 8), colour).save(root / cls / f"{i}.png")
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n and then nothing a decoder wants")
    return root


@pytest.mark.parametrize("layout", ["--val-split", "train/ and val/"])
def test_splits_count_the_files_skipped_in_either_layout(tmp_path, layout):
    if layout == "--val-split":
        root = _folder_with_a_broken_png(tmp_path / "data")
        splits = datamod.load_splits(root, val_split=0.5)
    else:
        root = tmp_path / "data"
        _folder_with_a_broken_png(root / "train")
        _folder_with_a_broken_png(root / "val")
        splits = datamod.load_splits(root)
    broken = sorted(root.rglob("broken.png"))
    assert [p for p, _ in splits.skipped] == broken
    assert len(splits.train.samples) + len(splits.val.samples) == 8 * len(broken)


def test_train_logs_how_many_unreadable_files_it_skipped(tmp_path, caplog):
    from export import train

    root = _folder_with_a_broken_png(tmp_path / "data")
    cfg = train.TrainConfig(
        data=root, arch="resnet20", output=tmp_path / "run", epochs=1, batch_size=4, image_size=8,
        val_split=0.5, threads=1, progress=False,
    )  # fmt: skip
    with caplog.at_level("INFO", logger="export"):
        train.main(cfg)
    assert f"skipping unreadable image {root / 'a' / 'broken.png'}" in caplog.text
    assert "4 train / 4 val images (1 unreadable skipped)" in caplog.text
