"""Decoding references within bounds: pixel limits from the header on every path (a decompression
bomb is flowgen's one-line error, never PIL's), a loader that keeps only the size the engine uses
(bit-identical to the full-size path) in a cache bounded by bytes, and RSS that comes back after
decoding 64 MP references (issue 18, item 3: four 8000x8000 PNGs had pinned 1.5 GB)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowgen.engine.byte_lru import ByteLRU
from flowgen.engine.references import images
from flowgen.engine.references.files import ReferenceImageError
from flowgen.engine.references.images import (
    MAX_SERVE_INPUT_PIXELS,
    image_header,
    load_image,
    prepare_reference,
)
from flowgen.errors import ImageInputError
from flowgen.plan.references import ReferenceInspector
from flowgen.recipe.validation import image_problem
from flowgen.run.references import ReferenceLoader, image_bytes
from tests.png_files import header_only_png, solid_png

ROOT = Path(__file__).parents[3]


def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], -1)
    image = Image.fromarray(np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8), "RGB")
    if mode == "RGBA":
        image.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L"))
    elif mode == "P":
        image = image.quantize(64)
    elif mode == "L":
        image = image.convert("L")
    return image


# --- a decompression bomb: flowgen's own error on every path ---------------------------------------


def test_a_bomb_png_is_flowgens_one_line_error_on_every_path(tmp_path):
    bomb = header_only_png(tmp_path / "bomb.png", 30000, 30000)  # 900 MP: beyond PIL's own hard limit
    limit = "the limit is 150,000,000 pixels"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        for call in (lambda: image_header(bomb), lambda: load_image(bomb), lambda: prepare_reference(bomb, name="b")):
            with pytest.raises(ReferenceImageError, match=rf"is too large \(900,000,000 pixels\); {limit}") as err:
                call()
            assert isinstance(err.value, ImageInputError) and "\n" not in str(err.value)
        # the server's bytes (never a file here), named by its field, with the server's limit
        with pytest.raises(ReferenceImageError, match=r"^reference image inputs.referenceImages\[0\]: is too large "
                           r"\(900,000,000 pixels\); the limit is 50,000,000 pixels$"):
            image_header(io.BytesIO(bomb.read_bytes()), label="inputs.referenceImages[0]",
                         max_pixels=MAX_SERVE_INPUT_PIXELS)
        with pytest.raises(ValueError, match=rf"bomb.png: is too large \(900,000,000 pixels\); {limit}"):
            ReferenceLoader().load(str(bomb))  # run, regen, canary, serve
        with pytest.raises(ValueError, match=rf"bomb.png: is too large \(900,000,000 pixels\); {limit}"):
            ReferenceInspector().inspect(bomb)  # plan
        assert image_problem(bomb) == f"is too large (900,000,000 pixels); {limit}"  # validate


def test_between_pils_warning_and_our_limit_is_quiet_and_the_size_is_named(tmp_path):
    large = header_only_png(tmp_path / "large.png", 12000, 12000)  # 144 MP: PIL warns above 89 MP
    over = header_only_png(tmp_path / "over.png", 13000, 13000)  # 169 MP: PIL would only warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert image_header(large).size == (12000, 12000)
        assert ReferenceInspector().inspect(large)[1] == (12000, 12000)
        message = "is 13000x13000 (169,000,000 pixels); the limit is 150,000,000 pixels"
        assert image_problem(over) == message
        with pytest.raises(ReferenceImageError, match="over.png: " + re.escape(message)):
            load_image(over)


def test_server_inputs_have_a_lower_pixel_limit(tmp_path):
    photo = header_only_png(tmp_path / "photo.png", 8000, 8000)  # 64 MP: fine in a recipe
    assert image_problem(photo) is None and image_header(photo).size == (8000, 8000)
    served = "is 8000x8000 (64,000,000 pixels); the limit is 50,000,000 pixels"
    assert MAX_SERVE_INPUT_PIXELS == 50_000_000 < images.MAX_DECODE_PIXELS
    assert image_problem(photo, max_pixels=MAX_SERVE_INPUT_PIXELS) == served
    with pytest.raises(ValueError, match=re.escape(served)):
        ReferenceLoader(max_pixels=MAX_SERVE_INPUT_PIXELS).load(str(photo))
    phone = header_only_png(tmp_path / "phone.png", 8064, 6048)  # a 48 MP phone photo is served
    assert image_problem(phone, max_pixels=MAX_SERVE_INPUT_PIXELS) is None


def test_running_out_of_memory_while_decoding_is_a_clean_error(tmp_path, monkeypatch):
    path = tmp_path / "ok.png"
    noise_image(96, 80).save(path)

    def no_memory(self):
        raise MemoryError

    monkeypatch.setattr(Image.Image, "load", no_memory)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_memory)
    with pytest.raises(ImageInputError, match=r"ok.png: not enough memory to decode it$"):
        load_image(path)
    with pytest.raises(ValueError, match=r"ok.png: not enough memory to decode it$"):
        ReferenceLoader().load(str(path))


# --- decoded at the size the engine uses: bit-identical -------------------------------------------


def _todays_path(path: Path) -> np.ndarray:
    """What runs computed before the loader reduced references: full-size RGB into prepare_reference."""
    return prepare_reference(load_image(path).convert("RGB"))


@pytest.mark.parametrize("size, mode, ext", [((1500, 900), "RGB", "png"), ((2000, 1200), "RGBA", "png"),
                                             ((1400, 1100), "P", "png"), ((1700, 1000), "L", "png"),
                                             ((1600, 1200), "RGB", "jpg"), ((1030, 1030), "RGB", "png"),
                                             ((640, 480), "RGB", "png")])
def test_the_loader_reduces_early_and_the_engine_result_is_bit_identical(size, mode, ext, tmp_path):
    path = tmp_path / f"ref.{ext}"
    noise_image(*size, mode=mode).save(path, **({"quality": 92} if ext == "jpg" else {}))
    loaded = ReferenceLoader().load(str(path))
    expected_size = images._target_area_size(size) if size[0] * size[1] > images.MAX_AREA else size
    assert loaded.mode == "RGB" and loaded.size == expected_size  # only the engine's area is kept
    np.testing.assert_array_equal(prepare_reference(loaded), _todays_path(path))


def test_an_exif_rotated_phone_photo_is_reduced_upright_and_bit_identical(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "phone.jpg"
    noise_image(1800, 1000).save(path, quality=95, exif=exif)
    loaded = ReferenceLoader().load(str(path))
    assert loaded.size == images._target_area_size((1000, 1800))  # portrait
    np.testing.assert_array_equal(prepare_reference(loaded), _todays_path(path))
    assert ReferenceInspector().inspect(path)[1] == (1000, 1800)  # the plan's upright size agrees


def test_reducing_never_turns_an_accepted_shape_into_a_refused_one():
    # the engine checks side and aspect limits on the size it receives; the loader reduces only what
    # the engine accepts at full size (the rest keeps its size, see below), and the reduced size must
    # still be accepted at every aspect ratio near the 8:1 limit
    for short in range(363, 2000, 7):
        for long in range(8 * short - 24, 8 * short + 25):
            for size in ((long, short), (short, long)):
                if images._shape_problem(size) is None:
                    assert images._shape_problem(images._target_area_size(size)) is None, size


def test_a_refused_shape_keeps_its_full_size_so_the_error_names_it(tmp_path):
    path = tmp_path / "strip.png"
    noise_image(4500, 500).save(path)  # 9:1
    loaded = ReferenceLoader().load(str(path))
    assert loaded.size == (4500, 500)
    with pytest.raises(ImageInputError, match=r"aspect ratio 9.0:1 \(4500x500\) exceeds 8:1"):
        prepare_reference(loaded)


# --- caches bounded by bytes -------------------------------------------------------------------------


def test_byte_lru_keeps_at_most_its_budget_least_recently_used_out():
    cache: ByteLRU[bytes] = ByteLRU(100, len)
    for key in "abcd":
        cache.put(key, b"x" * 30)
    assert (len(cache), cache.nbytes) == (3, 90) and "a" not in cache  # d evicted a
    cache.get("b")  # now the most recent
    cache.put("e", b"x" * 50)  # over budget: c and d go, b stays
    assert sorted(cache._items) == ["b", "e"] and cache.nbytes == 80
    cache.put("huge", b"x" * 101)  # larger than the whole budget: handed back, not kept
    assert "huge" not in cache and cache.nbytes == 80
    assert cache.get_or_make("f", lambda: b"y" * 10) == b"y" * 10 and cache.nbytes == 90
    cache.put("b", b"z" * 5)  # replacing a value re-measures it
    assert cache.nbytes == 65
    newest: ByteLRU[bytes] = ByteLRU(100, len, keep_newest=True)
    newest.put("a", b"x" * 60)
    newest.put("big", b"x" * 150)  # kept alone until the next value
    assert sorted(newest._items) == ["big"] and newest.nbytes == 150
    newest.put("c", b"x" * 10)
    assert sorted(newest._items) == ["c"] and newest.nbytes == 10


def test_the_loader_cache_is_bounded_by_bytes_not_entries(tmp_path):
    paths = []
    for index in range(6):
        path = tmp_path / f"r{index}.png"
        noise_image(1100, 1000, seed=index).save(path)  # > 1 MP: each kept reduced, ~4 MiB
        paths.append(str(path))
    one = image_bytes(ReferenceLoader().load(paths[0]))
    assert one == 4 * images._target_area_size((1100, 1000))[0] * images._target_area_size((1100, 1000))[1]
    loader = ReferenceLoader(cache_bytes=3 * one + one // 2)  # room for three
    first = loader.load_all(paths)
    assert loader.cached_bytes == 3 * one
    assert loader.load(paths[-1]) is first[-1]  # recent ones are served from the cache
    assert loader.load(paths[0]) is not first[0]  # the oldest was evicted and decoded again
    assert loader.cached_bytes <= loader._cache.max_bytes


def test_the_engine_reference_cache_bounds_latents_and_kv_by_bytes():
    import jax.numpy as jnp

    from flowgen.engine.references.cache import CachedKV, PreparedSet, ReferenceCache

    class FakeVae:
        def encode(self, pixels):  # (1, H, W, 3) -> (1, 32, H/8, W/8) float32, as the VAE shapes it
            _, h, w, _ = pixels.shape
            return jnp.full((1, 32, h // 8, w // 8), float(pixels[0, 0, 0, 0]), jnp.float32)

    def refs(value: float) -> PreparedSet:
        return PreparedSet((np.full((256, 256, 3), value, np.float32),), (f"k{value}",))

    per_latent = 32 * 32 * 32 * 4
    cache = ReferenceCache(FakeVae(), transformer=None, latent_bytes=3 * per_latent, kv_bytes=10)
    for value in range(5):
        cache.tokens(refs(float(value)))
    assert cache.counters["vae_encode"] == 5 and cache._latents.nbytes == 3 * per_latent and len(cache._latents) == 3
    cache.tokens(refs(4.0))
    assert cache.counters["vae_encode"] == 5  # the most recent is still cached
    cache.tokens(refs(0.0))
    assert cache.counters["vae_encode"] == 6  # the oldest was not
    kv = CachedKV(tuple(jnp.zeros((2, 1, 2, 4, 8), jnp.bfloat16) for _ in range(4)), 4)  # 1 KiB: over 10 bytes
    assert cache._kv.get_or_make("set", lambda: kv) is kv and "set" in cache._kv  # the newest set stays
    assert cache.cached_bytes == 3 * per_latent + 4 * 2 * 1 * 2 * 4 * 8 * 2


# --- RSS after decoding large references (in a subprocess: a clean heap to measure) ----------------

RSS_BOUND_MB = 150  # before the fix: +976 MB (the cache held four full-size 8000x8000 images)
PEAK_BOUND_MB = 600  # one 64 MP decode at a time: ~256 MB (PIL keeps RGB at 4 bytes a pixel) + the resize

_MEASURE = """
import gc, json, sys
import psutil
from flowgen.run.references import ReferenceLoader
process = psutil.Process()
gc.collect()
before = process.memory_info().rss
loader = ReferenceLoader()
images = loader.load_all(sys.argv[1:])
gc.collect()
after = process.memory_info().rss
# the peak of this process's own memory map (VmHWM): ru_maxrss would also count the parent's RSS,
# which Linux carries into a child across fork + exec (a 1.8 GB pytest made it read 1810 MB)
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"before": before, "after": after, "peak": peak,
                  "cached": loader.cached_bytes, "sizes": [list(image.size) for image in images]}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS and VmHWM as Linux reports them")
def test_rss_stays_bounded_after_decoding_four_8000x8000_pngs(tmp_path):
    paths = [solid_png(tmp_path / f"big{i}.png", 8000, 8000, (40 * i, 120, 200)) for i in range(4)]
    assert all(path.stat().st_size < 300_000 for path in paths)  # small files, 64 MP each
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _MEASURE, *map(str, paths)], check=False, capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout)
    grown_mb = (measured["after"] - measured["before"]) / 2**20
    peak_mb = (measured["peak"] - measured["before"]) / 2**20
    assert measured["sizes"] == [[1024, 1024]] * 4  # kept at the engine's size
    assert measured["cached"] == 4 * 1024 * 1024 * 4
    assert grown_mb < RSS_BOUND_MB, f"RSS grew {grown_mb:.0f} MB after decoding (bound {RSS_BOUND_MB} MB)"
    assert peak_mb < PEAK_BOUND_MB, f"RSS peaked {peak_mb:.0f} MB above the start (bound {PEAK_BOUND_MB} MB)"
