"""Faults against a real `flowgen serve` process: kill -9 and restart, a WebSocket client that leaves.

The server is the CLI itself (a subprocess on a free loopback port, the tiny model `flowgen:1@1`,
small images and few steps), so what is checked is what a user gets: the SQLite task record
survives kill -9, a restart on the same --data-dir answers getResponse for the finished task and
answers the task that was running with the interrupted error, and a client that drops its
WebSocket mid-task gets the result after reconnecting with its connectionSessionUUID.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from tests.serve.serve_process import KEY, ServeProcess, free_port

# real `flowgen serve` processes, killed and restarted
pytestmark = pytest.mark.slow


def tiny_task(**fields) -> dict:
    out = {"taskType": "imageInference", "taskUUID": str(uuid.uuid4()), "model": "flowgen:1@1",
           "positivePrompt": "a small boat", "width": 128, "height": 128, "steps": 2, "seed": 3,
           "deliveryMethod": "async", "outputType": "base64Data", "outputFormat": "PNG"}
    out.update(fields)
    return out


@pytest.fixture
def serve(tmp_path):
    started: list[ServeProcess] = []

    def make(port: int | None = None) -> ServeProcess:
        process = ServeProcess(tmp_path / "data", port or free_port(), tmp_path / "serve.log").start()
        started.append(process)
        return process

    yield make
    for process in started:
        process.stop()


def test_kill_9_then_restart_answers_finished_tasks_and_fails_the_running_one(serve):
    first = serve()
    finished = tiny_task()
    assert first.post([finished]).json()["data"][0]["taskUUID"] == finished["taskUUID"]
    done = first.poll_until_done(finished["taskUUID"]).json()
    assert done["data"][0]["status"] == "success", done
    # another shape: a new compile, so it is still running when the process dies right after the ack
    running = tiny_task(width=256, height=256, steps=4)
    assert first.post([running]).json()["data"][0]["taskUUID"] == running["taskUUID"]
    first.kill9()

    second = serve()
    again = second.poll_until_done(finished["taskUUID"]).json()
    assert [(item["status"], item["seed"]) for item in again["data"]] == [("success", 3)]
    assert again["data"][0]["imageBase64Data"] == done["data"][0]["imageBase64Data"]
    interrupted = second.post([{"taskType": "getResponse", "taskUUID": running["taskUUID"]}])
    error = interrupted.json()["errors"][0]
    assert (error["code"], error["taskUUID"]) == ("taskInterrupted", running["taskUUID"]), error
    assert second.post([{"taskType": "ping", "ping": True}]).json()["data"] == [{"taskType": "ping", "pong": True}]


def test_a_websocket_client_that_drops_mid_task_gets_the_result_after_reconnecting(serve):
    from websockets.sync.client import connect

    server = serve()
    ws_url = server.url.replace("http://", "ws://") + "/v1"
    with connect(ws_url, open_timeout=10) as ws:
        ws.send(json.dumps([{"taskType": "authentication", "apiKey": KEY}]))
        session = json.loads(ws.recv(10))["data"][0]["connectionSessionUUID"]
        t = tiny_task(deliveryMethod="sync", numberResults=2)
        ws.send(json.dumps([t]))
        # leave once the server has accepted the task (recorded: getResponse knows it), while the
        # first batch of the tiny model still compiles
        deadline = time.monotonic() + 10
        while "errors" in server.post([{"taskType": "getResponse", "taskUUID": t["taskUUID"]}]).json():
            assert time.monotonic() < deadline, "the server never accepted the task"
            time.sleep(0.02)
        assert server.post([{"taskType": "getResponse", "taskUUID": t["taskUUID"]}]).json()["data"][0]["status"] \
            == "processing"
    with connect(ws_url, open_timeout=10) as ws:
        ws.send(json.dumps([{"taskType": "authentication", "apiKey": KEY, "connectionSessionUUID": session}]))
        assert json.loads(ws.recv(10))["data"][0]["connectionSessionUUID"] == session
        deadline = time.monotonic() + 60
        while True:
            ws.send(json.dumps([{"taskType": "getResponse", "taskUUID": t["taskUUID"]}]))
            frame = json.loads(ws.recv(60))
            assert "data" in frame, frame
            items = frame["data"]
            if items[0]["status"] != "processing" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert [(item["status"], item["seed"]) for item in items] == [("success", 3), ("success", 4)]
    assert all(item["imageBase64Data"] for item in items)
