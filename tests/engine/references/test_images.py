"""Reference-image preparation must equal diffusers' Klein pipelines (plus EXIF orientation)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flowgen.engine.references import images
from flowgen.errors import ImageInputError


def _noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A detailed image (smooth gradient + noise) so resampling and crop offsets matter."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], -1)
    pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")
        image.putalpha(alpha)
    elif mode == "P":
        image = image.quantize(64)
    elif mode in ("L", "CMYK"):
        image = image.convert(mode)
    return image


def _diffusers_prepare(image: Image.Image) -> np.ndarray:
    """What Flux2KleinKVPipeline.__call__ does to each `image` entry, as (H, W, 3)."""
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    processor = Flux2ImageProcessor(vae_scale_factor=16)  # pipeline: vae_scale_factor * 2
    processor.check_image_input(image)
    width, height = image.size
    if width * height > 1024 * 1024:
        image = processor._resize_to_target_area(image, 1024 * 1024)
        width, height = image.size
    width, height = (width // 16) * 16, (height // 16) * 16
    tensor = processor.preprocess(image, height=height, width=width, resize_mode="crop")
    return tensor[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize(
    "size, mode",
    [((1500, 900), "RGB"), ((333, 517), "RGB"), ((1024, 1024), "RGB"), ((2000, 1200), "RGBA"),
     ((700, 480), "P"), ((1100, 1000), "L"), ((250, 130), "CMYK"), ((64, 512), "RGB")],
)
def test_matches_diffusers(size, mode, tmp_path):
    image = _noise_image(*size, mode=mode)
    expected = _diffusers_prepare(image)
    ours = images.prepare_references([image])[0]
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    assert ours.shape[0] % 16 == 0 and ours.shape[1] % 16 == 0
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    assert images.prepared_size(*size) == ours.shape[:2]
    # from a file too (PNG is lossless; CMYK goes through TIFF)
    path = tmp_path / ("ref.tiff" if mode == "CMYK" else "ref.png")
    image.save(path)
    np.testing.assert_allclose(images.prepare_references([path])[0], expected, rtol=0, atol=1e-6)


def test_area_cap_and_crop_sizes():
    ours = images.prepare_references([_noise_image(1500, 900)])[0]
    # sqrt(1024² / (1500*900)) -> 1322x793 -> floored 1312x784
    assert ours.shape == (784, 1312, 3)
    assert images.prepare_references([_noise_image(333, 517)])[0].shape == (512, 320, 3)
    assert images.default_output_size(ours.shape[:2]) == (784, 1312)
    assert images.default_output_size(None) == (1024, 1024)


def test_exif_orientation_is_applied(tmp_path):
    image = _noise_image(400, 240)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "phone.jpg"
    image.save(path, quality=95, exif=exif)
    ours = images.prepare_references([path])[0]
    assert ours.shape == (400, 240, 3)  # portrait after orientation
    with Image.open(path) as raw:
        upright = raw.transpose(Image.Transpose.ROTATE_270)  # what exif_transpose does for orientation 6
        expected = _diffusers_prepare(upright)
        # diffusers itself would feed the sideways image: the difference is real
        assert _diffusers_prepare(raw.copy()).shape == (240, 400, 3)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)


def test_too_many_references():
    refs = [_noise_image(64, 64, seed=i) for i in range(5)]
    with pytest.raises(ImageInputError, match="5 reference images given; at most 4"):
        images.prepare_references(refs)
    assert len(images.prepare_references(refs[:4])) == 4


@pytest.mark.parametrize("size, message", [((63, 200), "too small"), ((200, 40), "too small"),
                                          ((1000, 120), "aspect ratio 8.3:1")])
def test_shape_errors_name_the_image(size, message):
    with pytest.raises(ImageInputError, match=rf"reference image cat\.png: .*{message}"):
        images.prepare_references([_noise_image(*size)], names=["cat.png"])


def test_missing_corrupt_and_truncated_files(tmp_path):
    with pytest.raises(ImageInputError, match="nope.png: does not exist"):
        images.prepare_references([tmp_path / "nope.png"])
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image at all")
    with pytest.raises(ImageInputError, match="junk.png: not a readable image file"):
        images.prepare_references([junk])
    good = tmp_path / "good.jpg"
    _noise_image(300, 300).save(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(ImageInputError, match="truncated.jpg: cannot decode"):
        images.prepare_references([truncated])
    with pytest.raises(ImageInputError, match="expected a file path or a PIL image"):
        images.prepare_references([np.zeros((64, 64, 3))])


def _write_huge_png_header(path, width: int, height: int) -> None:
    """A tiny PNG whose header claims width x height pixels (the payload is never decoded)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    # above our limit but below PIL's hard limit: refused by our header check, size named
    big = tmp_path / "big.png"
    _write_huge_png_header(big, 12500, 12500)
    with pytest.raises(ImageInputError, match=r"big.png: is 12500x12500 \(156,250,000 pixels\); the limit is 150,000,000"):
        images.prepare_references([big])
    # beyond PIL's hard limit PIL raises DecompressionBombError inside open(): still our one-line error
    bomb = tmp_path / "bomb.png"
    _write_huge_png_header(bomb, 20000, 20000)
    with pytest.raises(ImageInputError, match=r"bomb.png: is too large \(400,000,000 pixels\); the limit is 150,000,000"):
        images.prepare_references([bomb])
    # a lazily opened PIL image is checked before anything decodes it
    with pytest.warns(Image.DecompressionBombWarning), Image.open(big) as lazy:
        with pytest.raises(ImageInputError, match=r"#1: is 12500x12500 \(156,250,000 pixels\); the limit is"):
            images.prepare_references([lazy])
