"""The official Runware SDKs, unchanged, drive a real `flowgen serve` (uvicorn on loopback).

`runware` 0.5.x (WebSocket only) and `runware-sdk` 1.8.x (WebSocket and REST; async + polling by
default) both install the module `runware`, so each lives in its own venv at the repo root, made by
tests/serve/make_sdk_venvs.sh. Each SDK runs one client script (a subprocess with that venv's
python) that plays a list of cases and prints one JSON line per case; the test checks seeds and
decodes every returned image against what FakeEngine renders for the same task and seed; one
case on the tiny model checks that the pixels equal what `flowgen run` renders for that task and
seed. Every task names taskType and an AIR model id: runware-sdk otherwise asks the internet for a
schema. The load test (8 clients x 4 requests at once, plain httpx) needs no SDK venv.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import io
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from flowgen.engine.catalog.cards import list_cards
from flowgen.plan.job import Job
from flowgen.plan.seeds import result_seed
from flowgen.run.engine import BatchRequest, FakeEngine
from flowgen.serve.app import create_app
from flowgen.serve.batcher import Batcher
from tests.serve.sdk_clients import run_client
from tests.serve.serve_process import free_port

# the official SDKs in their own venvs against a real server
pytestmark = pytest.mark.slow

KEY = "sdk-test-key"
TINY = "flowgen:1@1"


@contextlib.contextmanager
def running_server(data_dir: Path, engine: FakeEngine, window_s: float = 0.01, max_batch: int = 4):
    """A real uvicorn `flowgen serve` app on `engine`; yields its base URL (http://127.0.0.1:PORT)."""
    import uvicorn

    card = next(card for card in list_cards() if card.tiny is not None)
    batcher = Batcher(lambda name: engine, window_s=window_s, max_batch=max_batch)
    app = create_app(batcher=batcher, data_dir=data_dir, models=[card], keys=frozenset({KEY}))
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert uv.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(10)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("serve"), FakeEngine()) as url:
        yield url


# --- the client scripts (run by each SDK venv's python) -------------------------------------------

# cases: {"name", "kind": "infer"|"upload", "task": {...}}; a referenceImages entry "$upload" is the
# imageUUID the last upload case returned. Prints {"name", "items"} or {"name", "error"} per case.
NEW_SDK_CLIENT = r'''
import asyncio, json, sys
from runware import Runware

cfg = json.loads(sys.stdin.read())

def plain(value):
    return value if isinstance(value, (dict, list, str, int, float, bool, type(None))) else dict(value)

async def main():
    uploaded = None
    client = Runware(api_key=cfg["key"], transport=cfg["transport"], ws_base_url=cfg["ws"],
                     http_base_url=cfg["http"])
    try:
        await client.connect()
    except Exception as err:
        print(json.dumps({"name": "connect", "error": {"type": type(err).__name__, "code": getattr(err, "code", None),
                                                       "message": str(err)}}), flush=True)
        return
    try:
        for case in cfg["cases"]:
            task = dict(case["task"])
            if "referenceImages" in task:
                task["referenceImages"] = [uploaded if r == "$upload" else r for r in task["referenceImages"]]
            try:
                if case["kind"] == "upload":
                    items = [dict(i) for i in await client.image_upload(task)]
                    uploaded = items[0]["imageUUID"]
                else:
                    items = [plain(i) for i in await client.run(task)]
                print(json.dumps({"name": case["name"], "items": items}), flush=True)
            except Exception as err:
                print(json.dumps({"name": case["name"], "error": {"type": type(err).__name__,
                      "code": getattr(err, "code", None), "message": str(err)}}), flush=True)
    finally:
        await client.close()

asyncio.run(asyncio.wait_for(main(), 60))
'''

OLD_SDK_CLIENT = r'''
import asyncio, base64, dataclasses, json, sys
from runware import Runware as RunwareServer, IImageInference

cfg = json.loads(sys.stdin.read())

def error(err):
    return {"type": type(err).__name__, "code": getattr(err, "code", None), "message": str(err)}

async def main():
    uploaded = None
    client = RunwareServer(api_key=cfg["key"], url=cfg["ws"], timeout=20000)
    try:
        await asyncio.wait_for(client.connect(), 10)  # a refused key surfaces on the first task
    except Exception as err:
        print(json.dumps({"name": "connect", "error": error(err)}), flush=True)
        return
    for case in cfg["cases"]:
        task = dict(case["task"])
        if "referenceImages" in task:
            task["referenceImages"] = [uploaded if r == "$upload" else r for r in task["referenceImages"]]
        try:
            if case["kind"] == "upload":
                # this SDK uploads local files only (a data URI comes back to it as its own "UUID")
                with open("upload.png", "wb") as out:
                    out.write(base64.b64decode(task["image"].split(",", 1)[1]))
                result = await client.uploadImage("upload.png")
                items = [dataclasses.asdict(result)]
                uploaded = result.imageUUID
            else:
                task.pop("taskType")
                result = await client.imageInference(requestImage=IImageInference(**task))
                if task.get("deliveryMethod") == "async":  # an ack: poll as the SDK's docs say
                    result = await client.getResponse(taskUUID=task["taskUUID"],
                                                      numberResults=task.get("numberResults", 1))
                items = [{k: v for k, v in dataclasses.asdict(i).items() if v is not None} for i in result]
            print(json.dumps({"name": case["name"], "items": items}), flush=True)
        except Exception as err:
            print(json.dumps({"name": case["name"], "error": error(err)}), flush=True)
    await client.disconnect()

asyncio.run(asyncio.wait_for(main(), 60))
'''


# --- what the server should have rendered ---------------------------------------------------------


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), value, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def infer(**fields) -> dict:
    out = {"taskType": "imageInference", "taskUUID": str(uuid.uuid4()), "model": TINY,
           "positivePrompt": "a lighthouse at dusk", "width": 256, "height": 256, "outputFormat": "PNG"}
    out.update(fields)
    return out


def expected_pixels(t: dict, index: int, reference: bytes | None = None) -> np.ndarray:
    """What FakeEngine renders for result `index` of task `t` (the server fills steps 4, the spec default)."""
    fields = {k: v for k, v in t.items() if k in ("positivePrompt", "width", "height")}
    job = Job.from_task({**fields, "steps": 4}, guidance=None)
    seed = result_seed(t.get("seed"), None, t["taskUUID"].lower(), index)
    references = [] if reference is None else [np.asarray(Image.open(io.BytesIO(reference)).convert("RGB"))]
    return FakeEngine().generate_batch(BatchRequest.for_jobs([(job, seed, references)], 1)).images[0]


def image_bytes(item: dict) -> bytes:
    if item.get("imageBase64Data"):
        return base64.b64decode(item["imageBase64Data"])
    if item.get("imageDataURI"):
        return base64.b64decode(item["imageDataURI"].split(",", 1)[1])
    response = httpx.get(item["imageURL"], timeout=10)
    assert response.status_code == 200, item["imageURL"]
    return response.content


def check_images(case: dict, answer: dict, reference: bytes | None = None) -> None:
    t = case["task"]
    assert "items" in answer, f"{case['name']}: {answer.get('error')}"
    items = sorted(answer["items"], key=lambda item: item["seed"])
    count = t.get("numberResults", 1)
    assert len(items) == count, case["name"]
    assert [item["seed"] for item in items] == [result_seed(t.get("seed"), None, t["taskUUID"].lower(), i)
                                                for i in range(count)]
    assert all(item["taskUUID"] == t["taskUUID"].lower() for item in items)
    key = {"URL": "imageURL", "base64Data": "imageBase64Data", "dataURI": "imageDataURI"}[t.get("outputType", "URL")]
    for index, item in enumerate(items):
        assert item.get(key), f"{case['name']}: no {key} in {sorted(item)}"
        got = np.asarray(Image.open(io.BytesIO(image_bytes(item))).convert("RGB"))
        np.testing.assert_array_equal(got, expected_pixels(t, index, reference), err_msg=case["name"])


def cases_for(delivery: list[str]) -> tuple[list[dict], bytes]:
    reference = png(77)
    cases = []
    for method in delivery:
        for output_type, seed in (("URL", 11), ("base64Data", 21), ("dataURI", 31)):
            cases.append({"name": f"{method}-{output_type}", "kind": "infer",
                          "task": infer(deliveryMethod=method, numberResults=2, outputType=output_type, seed=seed)})
    cases.append({"name": "ref-data-uri", "kind": "infer",
                  "task": infer(deliveryMethod="sync", outputType="base64Data", seed=5,
                                referenceImages=[data_uri(reference)])})
    cases.append({"name": "upload", "kind": "upload", "task": {"taskType": "imageUpload", "image": data_uri(reference)}})
    cases.append({"name": "ref-uploaded", "kind": "infer",
                  "task": infer(deliveryMethod="sync", outputType="base64Data", seed=6, referenceImages=["$upload"])})
    cases.append({"name": "bad-width", "kind": "infer", "task": infer(deliveryMethod="sync", width=250)})
    return cases, reference


def check_all(cases: list[dict], answers: dict[str, dict], reference: bytes) -> None:
    by_name = {case["name"]: case for case in cases}
    for name, case in by_name.items():
        if case["kind"] == "infer" and name != "bad-width":
            check_images(case, answers[name], reference if name.startswith("ref-") else None)
    upload = answers["upload"]["items"][0]
    assert upload["imageUUID"] and upload["imageURL"].split("?")[0].endswith(".png")  # a signed URL
    error = answers["bad-width"].get("error")
    assert error, f"a width of 250 rendered: {answers['bad-width']}"
    assert "width" in error["message"] and "16" in error["message"], error


@pytest.mark.parametrize("transport", ["rest", "websocket"])
def test_runware_sdk_drives_the_server(server, tmp_path, transport):
    cases, reference = cases_for(["sync", "async"])
    ws = server.replace("http://", "ws://") + "/v1"
    cfg = {"key": KEY, "transport": transport, "ws": ws, "http": server + "/v1", "cases": cases}
    answers = run_client("new", NEW_SDK_CLIENT, cfg, tmp_path)
    check_all(cases, answers, reference)


def test_old_runware_sdk_drives_the_server_over_websocket(server, tmp_path):
    cases, reference = cases_for(["sync", "async"])
    cfg = {"key": KEY, "ws": server.replace("http://", "ws://") + "/v1", "cases": cases}
    answers = run_client("old", OLD_SDK_CLIENT, cfg, tmp_path)
    check_all(cases, answers, reference)


@pytest.mark.parametrize("which, transport", [("new", "rest"), ("new", "websocket"), ("old", "websocket")])
def test_a_bad_key_is_refused_to_each_sdk(server, tmp_path, which, transport):
    cases = [{"name": "one", "kind": "infer", "task": infer(deliveryMethod="sync")}]
    cfg = {"key": "not-a-key", "transport": transport, "ws": server.replace("http://", "ws://") + "/v1",
           "http": server + "/v1", "cases": cases}
    answers = run_client(which, OLD_SDK_CLIENT if which == "old" else NEW_SDK_CLIENT, cfg, tmp_path)
    error = (answers.get("connect") or answers.get("one") or {}).get("error")
    assert error, f"a bad key got an answer: {answers}"
    assert "invalid API key" in error["message"], error  # the server's own message reached the caller


# --- load -----------------------------------------------------------------------------------------


def test_eight_clients_times_four_requests_at_once_all_complete_in_shared_batches(tmp_path):
    clients, per_client = 8, 4
    engine = FakeEngine(delay_per_image=0.005)  # a batch takes time, so the others queue behind it
    with running_server(tmp_path / "d", engine, window_s=0.02, max_batch=8) as url:
        start = threading.Barrier(clients)
        answers: dict[int, list] = {}

        def client(number: int) -> None:
            tasks = [infer(deliveryMethod="sync", seed=100 * number + i, outputType="base64Data",
                           positivePrompt=f"client {number} picture {i}") for i in range(per_client)]
            with httpx.Client(timeout=60) as http:
                start.wait()
                with concurrent.futures.ThreadPoolExecutor(per_client) as pool:  # 4 POSTs in flight at once
                    sent = list(pool.map(lambda t: http.post(url + "/v1", json=[t],
                                                             headers={"Authorization": f"Bearer {KEY}"}), tasks))
            answers[number] = [(t, response.status_code, response.json()) for t, response in zip(tasks, sent)]

        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        stats = httpx.get(url + "/v1/stats", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
        assert httpx.get(url + "/v1/stats", timeout=10).status_code == 401
    assert sorted(answers) == list(range(clients))
    for rows in answers.values():
        for t, status, body in rows:
            assert status == 200, body
            (item,) = body["data"]
            assert (item["taskUUID"], item["seed"]) == (t["taskUUID"].lower(), t["seed"])
            got = np.asarray(Image.open(io.BytesIO(base64.b64decode(item["imageBase64Data"]))).convert("RGB"))
            np.testing.assert_array_equal(got, expected_pixels(t, 0))
    assert stats["images"] == clients * per_client and stats["queue_depth"] == 0, stats
    assert stats["mean_batch_size"] > 1, stats  # continuous batching: requests shared engine calls


# --- the tiny model: what the server renders is what `flowgen run` renders -----------------------


def test_an_sdk_request_renders_the_same_pixels_as_flowgen_run(tmp_path):
    from flowgen.commands.run import run_command
    from flowgen.run.engine import PipelineEngine

    prompt, seed = "a paper crane on a desk", 5
    (tmp_path / "crane.yaml").write_text(
        "version: 1\nname: crane\nmodel: flux2-klein-tiny\n"
        f"task: {{positivePrompt: '{prompt}', width: 128, height: 128, steps: 2, seed: {seed}, outputFormat: PNG}}\n"
        "output: {dir: out, filename: 'crane_{result}.{ext}'}\n")
    out = tmp_path / "run"
    assert run_command(str(tmp_path / "crane.yaml"), str(out), [], None, False) == 0
    (rendered,) = [p for p in out.rglob("*.png") if ".flowgen" not in p.parts]
    expected = np.asarray(Image.open(rendered).convert("RGB"))

    engine = PipelineEngine("flux2-klein-tiny")
    with running_server(tmp_path / "d", engine, window_s=0.0, max_batch=1) as url:
        case = {"name": "tiny", "kind": "infer",
                "task": infer(deliveryMethod="sync", positivePrompt=prompt, width=128, height=128, steps=2,
                              seed=seed, outputType="base64Data")}
        cfg = {"key": KEY, "transport": "rest", "ws": "", "http": url + "/v1", "cases": [case]}
        answers = run_client("new", NEW_SDK_CLIENT, cfg, tmp_path)
    (item,) = answers["tiny"]["items"]
    assert item["seed"] == seed
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(item["imageBase64Data"]))).convert("RGB"))
    np.testing.assert_array_equal(got, expected)
