"""visalign.media: the one suffix table and the readers the gallery and DPO's pairs share."""

import io

import numpy as np
import pytest
from PIL import Image

from visalign import media


def test_one_suffix_table_serves_the_gallery_and_dpo():
    from visalign.gallery.decode import IMAGE_EXTS, VIDEO_EXTS
    from visalign.gallery.discover import MEDIA_EXTS

    assert MEDIA_EXTS == media.MEDIA_SUFFIXES == IMAGE_EXTS | VIDEO_EXTS
    assert {".png", ".jpg", ".jpeg", ".webp", ".gif", ".mp4"} <= media.MEDIA_SUFFIXES  # the gallery's before
    assert {".bmp", ".tif", ".tiff", ".webm", ".mov", ".avi", ".mkv"} <= media.MEDIA_SUFFIXES  # DPO's before
    assert ".gif" in media.PILLOW_SUFFIXES and ".gif" not in IMAGE_EXTS  # a frame, never a reference image
    assert not media.VIDEO_SUFFIXES & media.PILLOW_SUFFIXES


def test_dpo_decodes_rgb_files_as_before(tmp_path):
    """RGB and grayscale files give the pixels of Pillow's convert("RGB") + the bilinear resize and
    centre crop (the cache's preprocessing), from a path and from bytes."""
    from visalign.trainers.dpo.data import _resize_crop, decode_image

    rng = np.random.default_rng(0)
    for mode, arr in (("RGB", rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)),
                      ("L", rng.integers(0, 255, (40, 48), dtype=np.uint8))):
        path = tmp_path / f"{mode}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        with Image.open(path) as img:
            expect = np.asarray(_resize_crop(img.convert("RGB"), 32, 32), dtype=np.float32) / 255.0
        for src in (path, path.read_bytes()):
            got = decode_image(src, 32, 32).permute(1, 2, 0).numpy()
            assert np.array_equal(got, expect), mode


def test_a_corrupt_file_error_names_the_file(tmp_path):
    from visalign.trainers.dpo.data import load_media

    bad = tmp_path / "broken_pair.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(media.MediaError, match="broken_pair.png: not a readable image") as err:
        load_media(bad, 16, 16, None)
    assert err.value.reason == "not_an_image"
    with pytest.raises(media.MediaError, match="zero-byte"):
        (tmp_path / "empty.jpg").write_bytes(b"")
        media.read_media(tmp_path / "empty.jpg")
    frames = tmp_path / "clip"
    frames.mkdir()
    with pytest.raises(media.MediaError, match="clip: no frame images"):
        load_media(frames, 16, 16, 2)
    Image.new("RGB", (8, 8)).save(frames / "000.png")
    with pytest.raises(ValueError, match="clip: 1 frames, fewer than the 2 needed"):
        load_media(frames, 16, 16, 2)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    with pytest.raises(media.MediaError, match=r"<\d+ bytes>: "):
        media.read_image(buf.getvalue()[:20])


def test_frames_of_an_animation():
    frames = [Image.new("L", (4, 4), 30 * i) for i in range(5)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    data = buf.getvalue()
    assert media.read_image(data, max_frames=1)[0].shape == (4, 4, 3)  # the first frame
    every, info = media.read_image(data)
    assert every.shape == (5, 4, 4, 3) and info["frames"] == 5
    assert media.read_image(data, max_frames=3)[0][:, 0, 0, 0].tolist() == [0, 60, 120]


def test_iter_jsonl_numbers_lines_and_is_strict_when_asked(tmp_path):
    from visalign.io import iter_jsonl, read_jsonl

    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3, "cut')
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (3, {"a": 2})]
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}] and read_jsonl(tmp_path / "none.jsonl") == []
    with pytest.raises(ValueError, match="rows.jsonl:4: not JSON"):
        list(iter_jsonl(path, strict=True))
