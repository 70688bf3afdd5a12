"""Decoding one file: every mode converted to the RGB the test computes itself; every bad file a reason."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from visalign.gallery.decode import decode_file, make_thumbnail
from visalign.gallery.loader import iter_batches


def test_every_good_file_decodes_to_the_expected_rgb(gallery):
    for name, expected in gallery["good"].items():
        d = decode_file(3, str(gallery["root"] / name))
        assert d.reason is None, (name, d.error)
        assert d.index == 3 and d.pixels.dtype == np.uint8
        assert d.pixels.shape == expected.shape, name
        # exact for lossless formats; the alpha composite may round one level apart
        assert np.abs(d.pixels.astype(int) - expected.astype(int)).max() <= 1, name


def test_modes_are_reported(gallery):
    modes = {n: decode_file(0, str(gallery["root"] / n)).info["mode"] for n in ("cmyk.jpg", "gray16.png", "alpha.png", "palette.png", "gray.png")}
    assert modes["cmyk.jpg"] == "CMYK" and modes["alpha.png"] == "RGBA" and modes["palette.png"] == "P"
    assert modes["gray.png"] == "L" and modes["gray16.png"].startswith("I")


def test_16_bit_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g.png")
    d = decode_file(0, str(tmp_path / "g.png"))
    assert d.pixels[0, :, 0].tolist() == [0, 1, 128, 255]  # v / 65535 * 255, rounded


def test_palette_with_transparency_composites_over_white(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png", transparency=0)
    d = decode_file(0, str(tmp_path / "p.png"))
    assert d.pixels[0].tolist() == [[255, 255, 255], [200, 100, 50]]


def test_bad_files_give_reasons_not_exceptions(gallery):
    for name, reason in gallery["bad"].items():
        d = decode_file(0, str(gallery["root"] / name))
        assert d.pixels is None, name
        allowed = {reason, "not_an_image"} if name.endswith(".mp4") else {reason}
        assert d.reason in allowed, (name, d.reason, d.error)
        assert name.split(".")[0] in d.error  # the error names the file


def test_pixel_limit_against_pillows_own(gallery, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow's limit far below the 32x32 image
    path = str(gallery["root"] / "gray.png")
    assert decode_file(0, path, max_pixels=32 * 32 - 1).reason == "decompression_bomb"
    assert decode_file(0, path, max_pixels=32 * 32).pixels.shape == (32, 32, 3)  # ours lifts Pillow's for the call
    assert Image.MAX_IMAGE_PIXELS == 100  # ...and puts it back
    assert "max_pixels=1023" in decode_file(0, path, max_pixels=1023).error


def test_gif_frames_are_subsampled_evenly(tmp_path):
    frames = [Image.new("L", (8, 8), 20 * i) for i in range(10)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50)
    d = decode_file(0, str(tmp_path / "a.gif"), max_frames=4)
    assert d.pixels.shape == (4, 8, 8, 3) and d.info["frames"] == 10
    assert d.pixels[:, 0, 0, 0].tolist() == [0, 60, 120, 180]  # frames 0, 3, 6, 9


def test_thumbnail_is_a_small_jpeg_data_uri():
    uri = make_thumbnail(np.zeros((300, 150, 3), np.uint8), size=96)
    head, b64 = uri.split(",", 1)
    assert head == "data:image/jpeg;base64"
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "JPEG" and img.size == (48, 96)


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_hold_one_size_and_every_file_once(gallery, workers):
    paths = sorted(str(p) for p in gallery["root"].rglob("*") if p.suffix in (".png", ".jpg", ".webp", ".gif", ".mp4"))
    seen = []
    for batch in iter_batches(paths, batch_size=3, workers=workers):
        assert 1 <= len(batch) <= 3
        if batch[0].pixels is None:
            assert all(d.pixels is None for d in batch)
        else:
            assert len({d.pixels.shape for d in batch}) == 1
        seen.extend(d.index for d in batch)
    assert sorted(seen) == list(range(len(paths)))
