"""Face refinement (`ultralytics`): detection on a real photo, img2img's partial schedule against
diffusers, and a refined face that changes nothing outside its padded, feathered box."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest

from flowgen.engine.faces import detect as face_detect
from flowgen.engine.faces.detect import Face, FaceDetectorUnavailable, NudeNetFaces, YoloFaces, decode_yolov8, nms
from flowgen.engine.faces.refine import (
    FaceRefineSettings,
    blur_reach,
    crop_box,
    feathered_mask,
    fitted_blur,
    padded_box,
    paste,
    refine_faces,
)

pytest.importorskip("nudenet")
pytest.importorskip("skimage")

# Landmarks read off skimage's astronaut (512x512): the eyes and the middle of the mouth.
EYES = ((207, 118), (243, 118))
MOUTH = (225, 150)
STEPS, STRENGTH, SEED = 4, 0.5, 3


def small(**overrides) -> FaceRefineSettings:
    """Settings that keep the tiny model's loop small: 64² crops, 2 of 4 steps."""
    values = dict(positive_prompt="a smiling astronaut", negative_prompt="", confidence=0.5, inpaint_size=64,
                  steps=STEPS, strength=STRENGTH)
    return FaceRefineSettings(**{**values, **overrides})


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from flowgen.engine.catalog import tiny_model
    from flowgen.engine.pipeline import Pipeline

    return Pipeline.from_pretrained(tiny_model.write_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


def _contains(box, point) -> bool:
    x0, y0, x1, y1 = box
    return x0 <= point[0] < x1 and y0 <= point[1] < y1


def _iou(a, b) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


# ---- detection ----------------------------------------------------------------------------------


def test_nudenet_finds_the_astronauts_face(astronaut):
    faces = NudeNetFaces().detect(astronaut)
    assert len(faces) == 1 and faces[0].label == "FACE_FEMALE" and 0.5 < faces[0].score <= 1
    box = faces[0].box
    assert all(_contains(box, p) for p in (*EYES, MOUTH)), box
    x0, y0, x1, y1 = box  # the face, not the helmet ring below it or the whole portrait
    assert 150 <= x0 and x1 <= 300 and 60 <= y0 and y1 <= 200, box


def test_yolo_decode_and_nms_by_hand_agree_with_nudenet_on_its_own_model(astronaut):
    import nudenet.nudenet

    path = Path(nudenet.nudenet.__file__).parent / "320n.onnx"  # a YOLOv8 export with ultralytics metadata
    yolo = YoloFaces(path)
    assert yolo.input_size == (320, 320) and [yolo.names[i] for i in yolo.face_classes] == ["FACE_FEMALE", "FACE_MALE"]
    assert yolo.identity["classes"] == ["FACE_FEMALE", "FACE_MALE"] and len(yolo.identity["sha256"]) == 64
    (mine,) = yolo.detect(astronaut)
    (theirs,) = NudeNetFaces().detect(astronaut)
    assert mine.label == theirs.label and _iou(mine.box, theirs.box) > 0.9
    assert abs(mine.score - theirs.score) < 0.15  # PIL's and cv2's resizes differ a little


def test_nms_keeps_the_best_of_overlapping_boxes_and_decode_picks_face_classes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 9]], np.float32)
    scores = np.array([0.6, 0.9, 0.5, 0.8], np.float32)
    assert nms(boxes, scores, 0.45) == [1, 2]
    assert nms(boxes, scores, 0.99) == [1, 3, 0, 2]
    # raw head (4 + 3 classes, 3 anchors): centre boxes; class 2 is not a face
    head = np.array([[5, 30, 70], [5, 30, 70], [10, 4, 6], [10, 4, 6],
                     [0.9, 0.1, 0.3], [0.0, 0.3, 0.1], [0.95, 0.95, 0.2]], np.float32)
    out_boxes, out_scores, classes = decode_yolov8(head, classes=(0, 1))
    np.testing.assert_allclose(out_boxes, [[0, 0, 10, 10], [28, 28, 32, 32], [67, 67, 73, 73]])
    np.testing.assert_allclose(out_scores, [0.9, 0.3, 0.3], rtol=1e-6)
    assert classes.tolist() == [0, 1, 0]
    assert decode_yolov8(head)[2].tolist() == [2, 2, 0]  # every class counts when none is named


def test_a_missing_yolo_file_is_a_one_line_error(tmp_path):
    with pytest.raises(FaceDetectorUnavailable, match=r"face detector .*nope\.onnx: file not found") as err:
        face_detect.face_detector(tmp_path / "nope.onnx")
    assert "\n" not in str(err.value)
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(FaceDetectorUnavailable, match="not a loadable ONNX model"):
        YoloFaces(tmp_path / "bad.onnx")


# ---- geometry -----------------------------------------------------------------------------------


def test_padded_and_crop_boxes_stay_inside_the_image():
    face = Face("FACE_FEMALE", 0.9, (173.2, 82.0, 274.6, 179.5))
    assert padded_box(face, 5, (512, 512)) == (168, 77, 280, 185)
    assert padded_box(Face("f", 1, (2, 3, 509, 510)), 20, (512, 512)) == (0, 0, 512, 512)
    x0, y0, x1, y1 = crop_box((168, 77, 280, 185), (512, 512))
    assert (x1 - x0, y1 - y0) == (112, 112) and x0 <= 168 and 280 <= x1 and y0 <= 77 and 185 <= y1
    assert crop_box((0, 0, 40, 20), (512, 512)) == (0, 0, 40, 40)  # pushed inside at the corner
    assert crop_box((10, 0, 90, 30), (30, 100)) == (10, 0, 90, 30)  # wider than the image is tall


@pytest.mark.parametrize("blur", [0, 1, 5, 10, 100])
def test_the_feather_lies_inside_the_box(blur):
    mask = feathered_mask((108, 112), blur)
    assert mask.shape == (108, 112) and (mask[27:81, 28:84] == 1.0).all()  # the middle half: fully refined
    edge = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
    assert (edge == 1.0).all() if blur == 0 else (edge == 0.0).all()
    middle = mask[54, :56]
    assert (np.diff(middle) >= 0).all()  # rises from the edge to the centre
    radius = fitted_blur((108, 112), blur)
    assert radius == blur if blur <= 5 else 0 < radius < blur  # a 10 px blur reaches 25 px: too wide here
    if blur:
        assert ((0 < middle) & (middle < 1)).sum() >= blur_reach(radius)  # a ramp as wide as the blur reaches


def test_paste_blends_by_the_mask_and_keeps_bytes_where_it_is_zero():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    region = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    mask = np.zeros((10, 12), np.float32)
    mask[2:8, 3:9], mask[4:6, 5:7] = 0.5, 1.0
    out = paste(image, region, (4, 5, 16, 15), mask)
    outside = np.ones((20, 30), bool)
    outside[5:15, 4:16] = False
    assert np.array_equal(out[outside], image[outside])
    inner, below = out[5:15, 4:16].astype(int), image[5:15, 4:16].astype(int)
    assert np.array_equal(inner[mask == 0], below[mask == 0]) and np.array_equal(inner[mask == 1], region[mask == 1])
    half = np.round(below + 0.5 * (region.astype(int) - below))
    assert np.array_equal(inner[mask == 0.5], half[mask == 0.5])


# ---- img2img: the partial schedule --------------------------------------------------------------


def _diffusers_scheduler(steps: int):
    """diffusers' FlowMatchEulerDiscreteScheduler with the Klein config, set as the Klein pipelines set
    it for 64² px (16 tokens)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from flowgen.engine.catalog import tiny_model
    from flowgen.engine.sampling import flow_schedule

    config = {k: v for k, v in tiny_model.SCHEDULER_CONFIG.items() if not k.startswith("_")}
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=flow_schedule.empirical_mu(16, steps))
    return scheduler


def _diffusers_start(scheduler, steps: int, strength: float):
    """Flux2KleinInpaintPipeline.get_timesteps: (begin index, remaining timesteps)."""
    from types import SimpleNamespace

    from diffusers.pipelines.flux2.pipeline_flux2_klein_inpaint import Flux2KleinInpaintPipeline

    timesteps, _ = Flux2KleinInpaintPipeline.get_timesteps(SimpleNamespace(scheduler=scheduler), steps, strength, "cpu")
    return scheduler.begin_index, timesteps


def test_img2img_start_index_is_diffusers_get_timesteps():
    from flowgen.engine.pipeline import img2img_start

    for steps in (1, 4, 20, 28, 50):
        scheduler = _diffusers_scheduler(steps)
        # a 0.05 grid, and values where int() and round() of steps·(1 − strength) part ways
        for strength in np.round(np.arange(0, 1.0001, 0.05), 2).tolist() + [0.01, 0.33, 0.35, 0.67, 0.99]:
            begin, _ = _diffusers_start(scheduler, steps, strength)
            assert img2img_start(strength, steps) == begin, (steps, strength)


@pytest.mark.slow
def test_img2img_noises_the_encoded_image_to_diffusers_sigma_and_samples_the_rest(pipe, astronaut, monkeypatch):
    import torch

    from flowgen.engine.pipeline import img2img_start, seed_noise
    from flowgen.engine.transformer.positions import pack

    image = np.ascontiguousarray(astronaut[100:164, 180:244])  # 64x64: 16 tokens
    seen = {}

    def spy(params, x, cond, sigmas, sampler, keys, guidance, **kwargs):
        seen.update(x=np.asarray(x), sigmas=np.asarray(sigmas))
        return x

    monkeypatch.setattr(pipe, "denoiser", spy)
    pipe.img2img([image], ["a face"], 0.3, steps=20, seeds=[SEED])
    scheduler = _diffusers_scheduler(20)
    begin, timesteps = _diffusers_start(scheduler, 20, 0.3)
    assert begin == img2img_start(0.3, 20) == 14
    np.testing.assert_array_equal(seen["sigmas"], scheduler.sigmas.numpy()[begin:])  # the remaining 6 steps, then 0
    np.testing.assert_array_equal(seen["sigmas"][:-1] * 1000, timesteps.numpy())

    latents = np.asarray(pipe.vae.encode(2.0 * (image[None].astype(np.float32) / 255.0) - 1.0))
    noise = np.asarray(seed_noise(SEED, latents.shape[1:]))[None]
    expected = scheduler.scale_noise(torch.tensor(latents), timesteps[:1], torch.tensor(noise)).numpy()
    np.testing.assert_allclose(seen["x"], np.asarray(pack(expected)), rtol=0, atol=1e-6)


def test_img2img_strength_zero_returns_the_images(pipe, astronaut):
    image = np.ascontiguousarray(astronaut[:64, :64])
    before = pipe.counters["img2img"]
    out = pipe.img2img([image], ["x"], 0.0, steps=4, seeds=[1])
    assert np.array_equal(out.images[0], image) and pipe.counters["img2img"] == before


def test_img2img_refuses_bad_arguments(pipe, astronaut):
    from flowgen.errors import FlowgenError

    with pytest.raises(FlowgenError, match="strength: 1.5 is not allowed; use a number from 0 to 1"):
        pipe.img2img([astronaut[:64, :64]], ["x"], 1.5, steps=4, seeds=[1])
    with pytest.raises(FlowgenError, match="multiples of 16"):
        pipe.img2img([astronaut[:60, :64]], ["x"], 0.5, steps=4, seeds=[1])


# ---- the whole pass on the photo ----------------------------------------------------------------


@pytest.mark.slow
def test_refining_the_face_changes_only_its_padded_feathered_region(pipe, astronaut):
    settings = small()
    result = refine_faces(pipe, astronaut, settings, seed=SEED)
    (face,) = result.faces
    assert result.detector["detector"] == "nudenet" and result.detector["model"] == "320n.onnx"
    assert face["refined"] is True and face["label"] == "FACE_FEMALE" and face["score"] >= settings.confidence
    x0, y0, x1, y1 = face["region"]
    assert tuple(face["region"]) == padded_box(Face("f", 1, tuple(face["box"])), settings.mask_padding, (512, 512))
    assert all(_contains(face["region"], p) for p in (*EYES, MOUTH))

    outside = np.ones(astronaut.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(result.image[outside], astronaut[outside])  # byte-identical outside the padded box
    mask = feathered_mask((y1 - y0, x1 - x0), settings.mask_blur)
    inside, before = result.image[y0:y1, x0:x1].astype(int), astronaut[y0:y1, x0:x1].astype(int)
    assert np.array_equal(inside[mask == 0], before[mask == 0])  # the feather's zero rim too
    changed = np.abs(inside - before).max(axis=2)
    assert changed[mask == 1].mean() > 10  # the face itself was re-rendered
    ramp = (mask > 0) & (mask < 1)
    assert ramp.any() and changed[ramp].mean() < changed[mask == 1].mean()  # feathered: a partial change
    again = refine_faces(pipe, astronaut, settings, seed=SEED)
    assert np.array_equal(again.image, result.image)  # a pure function of (image, settings, seed)
    assert not np.array_equal(refine_faces(pipe, astronaut, settings, seed=SEED + 1).image, result.image)


def test_strength_zero_leaves_the_image_unchanged(pipe, astronaut):
    before = pipe.counters["img2img"]
    result = refine_faces(pipe, astronaut, small(strength=0.0), seed=SEED)
    assert np.array_equal(result.image, astronaut) and pipe.counters["img2img"] == before
    assert result.faces[0]["refined"] is False and "no step" in result.faces[0]["why"]


def test_confidence_above_every_detection_changes_nothing(pipe, astronaut):
    score = NudeNetFaces().detect(astronaut)[0].score
    before = pipe.counters["img2img"]
    result = refine_faces(pipe, astronaut, small(confidence=min(1.0, round(score + 0.05, 2))), seed=SEED)
    assert np.array_equal(result.image, astronaut) and pipe.counters["img2img"] == before
    assert result.faces[0]["refined"] is False and "below confidence" in result.faces[0]["why"]



class _OneFace:
    name, identity = "fixed", {"detector": "fixed"}

    def detect(self, pixels):
        return [Face("face", 0.95, (40.0, 30.0, 80.0, 90.0))]


@pytest.mark.parametrize("distilled, guidance", [(True, None), (False, 6.5)])
def test_the_face_crop_goes_to_img2img_with_the_settings(distilled, guidance):
    from types import SimpleNamespace

    calls = []

    def img2img(images, prompts, strength, **kwargs):
        calls.append((images[0].shape, prompts, strength, kwargs))
        return SimpleNamespace(images=[np.full_like(images[0], 255)])

    image = np.zeros((128, 160, 3), np.uint8)
    settings = small(guidance=6.5, negative_prompt="blurry", mask_padding=4, mask_blur=0, inpaint_size=200)
    result = refine_faces(SimpleNamespace(distilled=distilled, img2img=img2img), image, settings, seed=11,
                          detector=_OneFace(), loras=[("brand.safetensors", 0.5)])
    ((shape, prompts, strength, kwargs),) = calls
    assert shape == (192, 192, 3) and prompts == ["a smiling astronaut"] and strength == STRENGTH  # 200 -> 192
    assert kwargs == {"steps": STEPS, "seeds": [11], "guidance": guidance, "negative_prompts": ["blurry"],
                      "loras": [("brand.safetensors", 0.5)]}
    changed = np.argwhere(result.image.any(axis=2))
    assert changed.min(axis=0).tolist() == [26, 36] and changed.max(axis=0).tolist() == [93, 83]  # box + 4 px
    assert result.faces[0]["region"] == [36, 26, 84, 94] and result.detector == {"detector": "fixed"}

# ---- the recipe and run layers ------------------------------------------------------------------


def test_every_ultralytics_field_is_checked_with_its_range():
    from flowgen.recipe import validation

    bad = {"strength": -0.1, "inpaintSize": 64, "CFGScale": 51, "confidence": 2, "maskBlur": 101, "maskPadding": 21,
           "steps": 0, "positivePrompt": 3, "bogus": 1}
    problems = validation.task_problems({"ultralytics": bad}, "task")
    assert problems == [
        "task.ultralytics.CFGScale: must be a number between 0 and 50 in steps of 0.1, got 51",
        "task.ultralytics.confidence: must be a number between 0 and 1 in steps of 0.01, got 2",
        "task.ultralytics.inpaintSize: must be an integer between 128 and 2048, got 64",
        "task.ultralytics.maskBlur: must be an integer between 0 and 100, got 101",
        "task.ultralytics.maskPadding: must be an integer between 0 and 20, got 21",
        "task.ultralytics.positivePrompt: must be a string, got 3",
        "task.ultralytics.steps: must be an integer between 1 and 100, got 0",
        "task.ultralytics.strength: must be a number between 0 and 1 in steps of 0.01, got -0.1",
        "task.ultralytics.bogus: unknown field; allowed: CFGScale, confidence, inpaintSize, maskBlur, maskPadding, "
        "negativePrompt, positivePrompt, steps, strength",
    ]
    good = {"strength": 0.3, "inpaintSize": 512, "CFGScale": 7.5, "confidence": 0.5, "maskBlur": 4, "maskPadding": 8,
            "steps": 12, "positivePrompt": "a face", "negativePrompt": "blurry"}
    assert validation.task_problems({"ultralytics": good}, "task") == []
    assert validation.model_rule_problems({"ultralytics": {"CFGScale": 8}}, "task", "runware:400@6", True) == [
        "task.ultralytics.CFGScale: runware:400@6 is guidance-distilled, so ultralytics.CFGScale must be absent or "
        "<= 1 (the face pass then runs without guidance), got 8"]
    assert validation.model_rule_problems({"ultralytics": {"CFGScale": 8}}, "task", "base", False) == []


def test_face_settings_take_the_spec_defaults_and_the_tasks_prompts(monkeypatch):
    from flowgen.run.faces import face_settings

    monkeypatch.delenv("FLOWGEN_FACE_DETECTOR", raising=False)
    task = {"positivePrompt": "a portrait", "negativePrompt": "blurry", "ultralytics": {"steps": 12, "strength": 0.4}}
    assert face_settings(task) == FaceRefineSettings(positive_prompt="a portrait", negative_prompt="blurry", steps=12,
                                                     strength=0.4)
    assert FaceRefineSettings("p") == FaceRefineSettings("p", "", 0.9, 1024, 5, 5, 20, 0.3, 8.0, None)  # the spec's
    monkeypatch.setenv("FLOWGEN_FACE_DETECTOR", "/models/face.onnx")
    own = face_settings({**task, "ultralytics": {"positivePrompt": "a face", "negativePrompt": "", "CFGScale": 3}})
    assert (own.positive_prompt, own.negative_prompt, own.guidance, own.detector) == ("a face", "blurry", 3.0,
                                                                                      "/models/face.onnx")
    assert face_settings({"positivePrompt": "x"}) is None


def _face_plan(out, **faces):
    from flowgen.plan import compile_plan
    from flowgen.recipe.api import Item

    items = [Item(key=key, values={}, task={"positivePrompt": f"prompt {key}", "width": 64, "height": 64, "steps": 2,
                                            "numberResults": 1, "outputFormat": "PNG", **extra})
             for key, extra in (("plain", {}), ("faces", {"ultralytics": faces}))]
    return compile_plan(recipe_name="r", recipe_seed=3, items=items, out_dir=out, model="tiny", model_identity={"m": 1},
                        filename=lambda it, i, ext: f"img/{it.key}_{i}.{ext}", distilled=False, recipe_hash="h")


def test_the_run_refines_per_result_records_the_faces_and_regen_replays_it(tmp_path, monkeypatch):
    from flowgen.run.engine import FakeEngine
    from flowgen.run.executor import against_folder, execute
    from flowgen.run.manifest import Manifest
    from flowgen.run.regen import regenerate

    monkeypatch.delenv("FLOWGEN_FACE_DETECTOR", raising=False)
    out, engine = tmp_path / "out", FakeEngine()
    summary = execute(against_folder(_face_plan(out, steps=6)), engine)
    assert (summary.rendered, summary.failed) == (2, 0)
    ((settings, seed),) = engine.face_calls  # only the item that asks for it
    assert (settings.positive_prompt, settings.steps, settings.strength) == ("prompt faces", 6, 0.3)
    with Manifest(out) as manifest:
        records = {r["item_key"]: r for r in manifest.records()}
    assert "faces" not in records["plain"] and records["faces"]["faces"][0]["refined"] is True
    assert records["faces"]["face_detector"] == {"detector": "fake"}
    assert seed == records["faces"]["seed"] and "faces" in records["faces"]["timings"]
    again = regenerate([records["faces"]], tmp_path / "regen", engine_for=lambda model, dtype: FakeEngine())
    assert again[0].matches, again[0]


def test_a_bad_face_detector_stops_the_run_before_anything_renders(tmp_path, monkeypatch):
    from flowgen.run.engine import FakeEngine
    from flowgen.run.executor import against_folder, execute
    from flowgen.run.manifest import Manifest

    monkeypatch.setenv("FLOWGEN_FACE_DETECTOR", str(tmp_path / "missing.onnx"))
    engine = FakeEngine()
    with pytest.raises(FaceDetectorUnavailable, match="missing.onnx: file not found"):
        execute(against_folder(_face_plan(tmp_path / "out")), engine)
    assert engine.calls == []
    with Manifest(tmp_path / "out") as manifest:
        assert list(manifest.records()) == []
