"""Decoding real encoded images of every awkward kind into uint8 RGB crops (header checks, then the cpu decoder)."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.embedding.tar import UNREAD, USED, iter_tar_samples
from pipeline.model.decoders.cpu import decode_one
from pipeline.model.decoders.cpu import decode_rgb as decode_checked
from pipeline.model.image_header import DEFAULT_MAX_PIXELS, SkipSample, read_header
from pipeline.model.preprocess import Preprocess, resize_crop
from shards import (FAULTS, UNDECODABLE, jpeg_bytes, palette_png_bytes, sample_image, write_tar)

PRE = Preprocess(input_size=32, resize_size=36)


def decode_rgb(data: bytes, target_short: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """The image as the reader decodes it before resizing: its header checked, then the cpu decoder's decode."""
    return decode_checked(data, read_header(data, target_short, max_pixels), target_short)


@pytest.mark.parametrize("name", sorted(set(FAULTS) - set(UNDECODABLE)))
def test_odd_but_valid_images_decode_to_rgb(name):
    ext, make = FAULTS[name]
    img = decode_rgb(make(), PRE.resize_size)
    assert img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3
    assert resize_crop(img, PRE).shape == (3, 32, 32)


@pytest.mark.parametrize("name", UNDECODABLE)
def test_undecodable_images_are_skipped_with_a_reason(name):
    with pytest.raises(SkipSample) as e:
        decode_rgb(FAULTS[name][1](), PRE.resize_size)
    assert str(e.value)


def test_bomb_refused_before_allocating_by_pixel_limit():
    big = jpeg_bytes(sample_image((300, 200)))
    with pytest.raises(SkipSample, match="300x200 pixels"):
        decode_rgb(big, 36, max_pixels=10_000)
    assert decode_rgb(big, 200, max_pixels=60_000).shape[1:] == (200, 300)


def test_empty_bytes_skipped():
    with pytest.raises(SkipSample, match="0 bytes"):
        decode_rgb(b"", 36)


def test_exif_orientation_applied():
    img = decode_rgb(FAULTS["exif_rotated"][1](), 36)
    assert img.shape[1:] == (64, 48)  # stored 64 wide x 48 high, displayed rotated


def test_grayscale_becomes_three_equal_channels():
    img = decode_rgb(FAULTS["grayscale"][1](), 36)
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])


def test_transparent_palette_pixels_become_white():
    im = Image.open(io.BytesIO(palette_png_bytes()))
    transparent = np.asarray(im) == im.info["transparency"]
    img = decode_rgb(palette_png_bytes(), 36).permute(1, 2, 0).numpy()
    assert transparent.any() and (img[transparent] == 255).all()


def test_large_jpeg_uses_scaled_decode_close_to_full_decode():
    data = jpeg_bytes(sample_image((1200, 900)), quality=95)
    scaled = resize_crop(decode_rgb(data, 36), PRE).float()
    assert decode_rgb(data, 36).shape[2] < 1200  # DCT-scaled: never decoded at full size
    full = resize_crop(decode_rgb(data, 2000), PRE).float()
    assert (scaled - full).abs().mean() < 4.0


def test_decode_one_is_header_check_decode_and_crop():
    data = jpeg_bytes(sample_image((90, 70)))
    assert torch.equal(decode_one(data, PRE), resize_crop(decode_rgb(data, PRE.resize_size), PRE))
    with pytest.raises(SkipSample, match="90x70 pixels"):
        decode_one(data, PRE, max_pixels=1000)


def test_tar_samples_grouped_by_key_with_dots_and_dirs(tmp_path):
    write_tar(tmp_path / "s.tar", [{"__key__": "dir/a", "jpg": b"x", "cls": 1}, {"__key__": "b", "seg.png": b"y"}])
    got = list(iter_tar_samples(str(tmp_path / "s.tar"), fields=(*USED, "seg.png")))
    assert [s["__key__"] for s in got] == ["dir/a", "b"]
    assert got[0]["cls"] == b"1" and got[1]["seg.png"] == b"y"


def test_only_the_used_fields_of_a_sample_are_read(tmp_path):
    write_tar(tmp_path / "s.tar", [{"__key__": "a", "jpg": b"x", "cls": 1, "bin": b"z" * 5000, "seg.png": b"y"}])
    (got,) = iter_tar_samples(str(tmp_path / "s.tar"))  # by default the fields any reader uses
    assert {k: v for k, v in got.items() if not k.startswith("__")} == {"jpg": b"x", "cls": b"1"}
    assert sorted(got[UNREAD]) == ["bin", "seg.png"]
