"""safety.checkContent: NudeNet's real detector on real photos (skimage.data), no mocks of the model.

Measured with nudenet 3.4.2 / onnxruntime 1.32 (CPU): astronaut -> FACE_FEMALE 0.720 and nothing
else; coffee, chelsea, rocket -> no detections. Fed the wrong channel order, astronaut's face scores
0.811 and coffee grows a BUTTOCKS_EXPOSED 0.296, so the RGB->BGR step is visible in the numbers.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np
import pytest

from flowgen import safety
from flowgen.errors import FlowgenError
from flowgen.safety import (
    EXPLICIT_LABELS,
    INSTALL_HINT,
    NUDENET_LABELS,
    ContentChecker,
    SafetyUnavailable,
    Verdict,
)

nudenet = pytest.importorskip("nudenet")
skdata = pytest.importorskip("skimage.data")

CLEAN_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {name: getattr(skdata, name)() for name in CLEAN_PHOTOS}


@pytest.fixture(scope="module")
def checker() -> ContentChecker:
    return ContentChecker().load()


def _pairs(found: list[dict]) -> list[tuple[str, float]]:
    return sorted(((d["class"], d["score"]) for d in found), key=lambda d: -d[1])


# ---- the label set ---------------------------------------------------------------------------


def test_labels_match_nudenet():
    assert NUDENET_LABELS == tuple(getattr(nudenet.nudenet, "__labels"))
    assert EXPLICIT_LABELS <= set(NUDENET_LABELS)
    assert all(label.endswith("_EXPOSED") for label in EXPLICIT_LABELS)
    assert {"MALE_BREAST_EXPOSED", "BELLY_EXPOSED", "FEET_EXPOSED", "ARMPITS_EXPOSED"}.isdisjoint(EXPLICIT_LABELS)


# ---- the real model on real photos -----------------------------------------------------------


@pytest.mark.parametrize("name", CLEAN_PHOTOS)
def test_photos_are_not_flagged(checker, photos, name):
    verdict = checker.check(photos[name])
    assert isinstance(verdict, Verdict)
    assert verdict.nsfw is False and verdict.flagged == ()
    assert verdict.threshold == 0.5
    record = verdict.as_record()
    assert record["NSFWContent"] is False
    json.dumps(record)


def test_astronaut_face_is_detected(checker, photos):
    verdict = checker.check(photos["astronaut"])
    assert [label for label, _ in verdict.detections] == ["FACE_FEMALE"]
    assert verdict.detections[0][1] == pytest.approx(0.720, abs=0.03)
    assert verdict.as_record()["detections"] == [{"label": "FACE_FEMALE", "score": round(verdict.detections[0][1], 4)}]


@pytest.mark.parametrize("name", ("coffee", "chelsea", "rocket"))
def test_no_people_no_detections(checker, photos, name):
    assert checker.check(photos[name]).detections == ()


def test_forced_flag_with_a_face_label(checker, photos):
    astronaut = photos["astronaut"]
    verdict = ContentChecker(threshold=0.1, labels={"FACE_FEMALE"}).check(astronaut)
    assert verdict.nsfw is True and verdict.flagged == ("FACE_FEMALE",)
    assert verdict.as_record()["NSFWContent"] is True
    assert verdict.as_record()["flagged"] == ["FACE_FEMALE"]

    # The threshold is inclusive, and a higher one clears it again.
    score = verdict.detections[0][1]
    assert ContentChecker(threshold=score, labels={"FACE_FEMALE"}).check(astronaut).nsfw is True
    assert ContentChecker(threshold=0.9, labels={"FACE_FEMALE"}).check(astronaut).nsfw is False
    # The default checker still says no: faces are not in EXPLICIT_LABELS.
    assert checker.check(astronaut).nsfw is False


def test_forced_flag_by_patching_the_module_label_set(monkeypatch, photos):
    monkeypatch.setattr(safety, "EXPLICIT_LABELS", EXPLICIT_LABELS | {"FACE_FEMALE"})
    verdict = ContentChecker(threshold=0.1).check(photos["astronaut"])
    assert verdict.nsfw is True and verdict.flagged == ("FACE_FEMALE",)


# ---- colour order ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ("astronaut", "coffee"))
def test_same_as_nudenet_reading_the_png(checker, photos, tmp_path, name):
    from PIL import Image

    path = tmp_path / f"{name}.png"
    Image.fromarray(photos[name]).save(path)  # RGB array -> PNG; nudenet reads it back with cv2 (BGR)
    reference = nudenet.NudeDetector().detect(str(path))
    assert checker.check(photos[name]).detections == tuple(_pairs(reference))


def test_channel_order_changes_the_numbers(checker, photos):
    astronaut = photos["astronaut"]
    right = checker.check(astronaut).detections
    swapped = checker.check(np.ascontiguousarray(astronaut[..., ::-1])).detections
    naive = _pairs(nudenet.NudeDetector().detect(astronaut))  # an RGB array handed to nudenet as is
    assert swapped == tuple(naive)
    assert right[0][0] == swapped[0][0] == "FACE_FEMALE"
    assert abs(right[0][1] - swapped[0][1]) > 0.03  # 0.720 vs 0.811 measured


def test_rgba_ignores_alpha(checker, photos):
    rgb = photos["astronaut"]
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    assert checker.check(rgba).detections == checker.check(rgb).detections


# ---- batching, threads, loading --------------------------------------------------------------


def test_check_many_equals_check(checker, photos):
    images = [photos[name] for name in CLEAN_PHOTOS]
    assert checker.check_many(images) == [checker.check(image) for image in images]
    assert checker.check_many([]) == []


def test_detector_loads_once_across_threads(monkeypatch, photos):
    real = safety._detector()
    calls = []

    def slow_load():
        calls.append(threading.get_ident())
        time.sleep(0.05)
        return real

    monkeypatch.setattr(safety, "_DETECTOR", None)
    monkeypatch.setattr(safety, "_load_detector", slow_load)
    image = photos["astronaut"]
    barrier = threading.Barrier(6)
    results: list[Verdict] = []

    def work():
        barrier.wait()
        results.append(ContentChecker().check(image))

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(calls) == 1
    assert len(results) == 6 and all(r == results[0] for r in results)
    assert results[0].detections[0][0] == "FACE_FEMALE"


def test_runs_on_cpu():
    assert safety._detector().onnx_session.get_providers() == ["CPUExecutionProvider"]


def test_fallback_when_nudedetector_refuses(monkeypatch, checker, photos):
    def refuse(self, *args, **kwargs):
        raise ValueError("This ORT build has ['CUDAExecutionProvider', 'CPUExecutionProvider'] enabled.")

    monkeypatch.setattr(nudenet.NudeDetector, "__init__", refuse)
    detector = safety._load_detector()
    assert detector.onnx_session.get_providers() == ["CPUExecutionProvider"]
    bgr = np.ascontiguousarray(photos["astronaut"][..., ::-1])
    assert tuple(_pairs(detector.detect(bgr))) == checker.check(photos["astronaut"]).detections


def test_load_failure_is_one_line(monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("bad model\nsecond line")

    monkeypatch.setattr(nudenet.NudeDetector, "__init__", broken)
    monkeypatch.setattr(safety, "_DETECTOR", None)
    with pytest.raises(SafetyUnavailable) as info:
        ContentChecker().load()
    assert "\n" not in str(info.value) and "failed to load" in str(info.value)


def test_missing_nudenet_is_a_clear_error(monkeypatch, photos):
    monkeypatch.setitem(sys.modules, "nudenet", None)  # makes `import nudenet` raise ImportError
    monkeypatch.setattr(safety, "_DETECTOR", None)
    checker = ContentChecker()  # construction never needs nudenet
    with pytest.raises(SafetyUnavailable) as info:
        checker.check(photos["coffee"])
    assert str(info.value) == INSTALL_HINT == "safety.checkContent needs NudeNet: pip install 'flowgen[safety]'"
    assert isinstance(info.value, FlowgenError)


def test_available():
    assert safety.available() is True


# ---- argument checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((8, 8), np.uint8),
        np.zeros((8, 8, 2), np.uint8),
        np.zeros((8, 8, 3), np.float32),
        np.zeros((0, 8, 3), np.uint8),
    ],
)
def test_rejects_bad_arrays(checker, bad):
    with pytest.raises(ValueError):
        checker.check(bad)


def test_rejects_non_arrays(checker):
    with pytest.raises(TypeError):
        checker.check([[0, 0, 0]])


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan")])
def test_rejects_bad_thresholds(threshold):
    with pytest.raises(ValueError):
        ContentChecker(threshold=threshold)


def test_rejects_bad_threshold_types_and_labels():
    with pytest.raises(TypeError):
        ContentChecker(threshold=True)
    with pytest.raises(TypeError):
        ContentChecker(threshold="0.5")
    with pytest.raises(ValueError, match="FACE_FMALE"):
        ContentChecker(labels={"FACE_FMALE"})
