"""Image outputs: metadata round-trip in JPG/PNG/WEBP, quality honoured, deterministic bytes, atomic writes."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from flowgen.errors import ImageInputError
from flowgen.run.atomic import atomic_write_bytes
from flowgen.run.outputs import encode_image, read_metadata

META = {"item_id": "abc123def456", "result_index": 2, "seed": 2**62 + 5, "params": {"positivePrompt": "naïve café ☕"}}


def pixels(seed=0):
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)
    return np.repeat(np.repeat(coarse, 8, 0), 8, 1)[:64, :64]


@pytest.mark.parametrize("ext,fmt", [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")])
def test_metadata_round_trip(tmp_path, ext, fmt):
    path = tmp_path / f"x.{ext}"
    data = encode_image(pixels(), ext, 90, META)
    path.write_bytes(data)
    assert read_metadata(path) == META
    with Image.open(path) as image:
        assert image.format == fmt and image.size == (64, 64)
    assert encode_image(pixels(), ext, 90, META) == data  # deterministic: regen can compare sha256


@pytest.mark.parametrize("ext", ["jpg", "webp"])
def test_output_quality_is_honoured(ext):
    big, small = (len(encode_image(pixels(1), ext, q, META)) for q in (95, 20))
    assert small < big
    lossy = np.asarray(Image.open(io.BytesIO(encode_image(pixels(1), ext, 20, META))))
    assert np.abs(lossy.astype(int) - pixels(1)).mean() > 1


def test_png_is_lossless():
    decoded = np.asarray(Image.open(io.BytesIO(encode_image(pixels(2), "png", None, META))))
    np.testing.assert_array_equal(decoded, pixels(2))


def test_huge_params_still_leave_a_pointer_in_jpeg(tmp_path):
    meta = {**META, "params": {"positivePrompt": "x" * 70_000}}
    path = tmp_path / "x.jpg"
    path.write_bytes(encode_image(pixels(), "jpg", 90, meta))
    assert read_metadata(path) == {k: v for k, v in meta.items() if k != "params"}


def test_foreign_image_has_no_metadata(tmp_path):
    path = tmp_path / "plain.png"
    Image.fromarray(pixels()).save(path)
    with pytest.raises(ImageInputError, match="no flowgen metadata"):
        read_metadata(path)


def test_atomic_write_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "deep" / "out.png"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(target.parent) == ["out.png"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    atomic_write_bytes(target, b"old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.png"]
