"""Images as users have them: greyscale, palette, CMYK and transparent files become RGB as a photo model expects,
and a file that cannot be decoded is found when the data is scanned, then named (or, with `skip_bad_images`, left out
and counted) before any training."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from pipeline.core.data import DataConfig, DataNotFoundError, load_data, locate, scan
from pipeline.core.data.images import read_rgb, to_rgb, unreadable
from pipeline.core.models import ModelConfig
from tests.conftest import TINY_MODEL, make_photos


def _odd_images(folder):
    """A greyscale JPEG, a CMYK JPEG, a palette PNG, a PNG with a transparent half, a 16-bit greyscale PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("L", (20, 16), 90).save(folder / "grey.jpg")
    Image.new("CMYK", (20, 16), (0, 255, 255, 0)).save(folder / "cmyk.jpg")  # red in print colours
    Image.new("RGB", (20, 16), (0, 0, 200)).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    rgba = Image.new("RGBA", (20, 16), (0, 0, 0, 0))  # transparent black on the left
    rgba.paste((0, 160, 0, 255), (10, 0, 20, 16))  # opaque green on the right
    rgba.save(folder / "alpha.png")
    Image.fromarray(np.full((16, 20), 40000, dtype=np.uint16)).save(folder / "grey16.png")
    return folder


def test_every_mode_becomes_rgb_and_transparency_shows_white(tmp_path):
    folder = _odd_images(tmp_path / "odd")
    images = {p.stem: np.asarray(read_rgb(p)) for p in folder.iterdir()}
    assert all(i.shape == (16, 20, 3) and i.dtype == np.uint8 for i in images.values())
    assert np.abs(images["grey"].astype(int) - 90).max() <= 2
    assert images["cmyk"][0, 0, 0] > 200 and images["cmyk"][0, 0, 1:].max() < 60  # red
    assert tuple(images["palette"][0, 0]) == (0, 0, 200)
    assert tuple(images["alpha"][0, 0]) == (255, 255, 255) and tuple(images["alpha"][0, -1]) == (0, 160, 0)
    assert abs(int(images["grey16"][0, 0, 0]) - 40000 // 256) <= 1  # scaled, not clipped to 255
    assert to_rgb(Image.new("RGB", (2, 2))).mode == "RGB"


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_or_fake_image_is_unreadable_and_says_why(tmp_path):
    root = make_photos(tmp_path / "p", {"train": 1, "test": 1})
    good = root / "train" / "ant" / "000.jpg"
    assert unreadable(good) is None
    _truncate(good)
    assert "truncated" in unreadable(good)
    fake = root / "train" / "bee" / "notes.jpg"
    fake.write_text("not an image")
    assert unreadable(fake).startswith("UnidentifiedImageError")


def _loader_model():
    return ModelConfig(name=TINY_MODEL)


def test_unreadable_images_stop_the_run_by_name_or_are_left_out_and_counted(tmp_path, caplog):
    root = make_photos(tmp_path / "p", {"train": 6, "test": 3})
    _odd_images(root / "train" / "cow")  # these decode: they are kept
    _truncate(root / "train" / "ant" / "002.jpg")
    (root / "test" / "bee" / "000.jpg").write_bytes(b"\xff\xd8 garbage")
    index = scan(locate(DataConfig(dataset="imagefolder", root=root)), tmp_path / "memo")
    assert set(index.unreadable) == {"train/ant/002.jpg", "test/bee/000.jpg"}
    cfg = DataConfig(dataset="imagefolder", root=root, batch_size=4)
    with pytest.raises(DataNotFoundError, match=r"2 image\(s\) cannot be read: train/ant/002.jpg .*skip_bad_images"):
        load_data(cfg, _loader_model(), index=index)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        bundle = load_data(cfg.model_copy(update={"skip_bad_images": True}), _loader_model(), index=index)
    assert bundle.skipped_images == 2 and bundle.params()["skipped_images"] == 2
    assert len(bundle.train) + len(bundle.val) == 3 * 6 + 5 - 1 and len(bundle.test) == 3 * 3 - 1
    assert "leaving out 2 unreadable image(s)" in caplog.text
    again = scan(locate(DataConfig(dataset="imagefolder", root=root)), tmp_path / "memo")  # from the memo
    assert again.unreadable == index.unreadable and again.fingerprint == index.fingerprint
