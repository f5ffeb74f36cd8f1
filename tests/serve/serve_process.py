"""A real `flowgen serve` process (the CLI in a subprocess, the tiny model, one key) on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

KEY = "fault-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServeProcess:
    """`flowgen serve` in a subprocess; start() waits until it answers a ping."""

    def __init__(self, data_dir, port: int, log_path):
        self.data_dir, self.port, self.log_path = data_dir, port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServeProcess:
        env = {**os.environ, "FLOWGEN_API_KEYS": KEY, "JAX_PLATFORMS": "cpu"}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "flowgen", "serve", "--model", "flowgen:1@1",
                                      "--port", str(self.port), "--data-dir", str(self.data_dir),
                                      "--window-ms", "10"], env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"flowgen serve exited: {self.log_path.read_text()[-2000:]}"
            try:
                if httpx.post(self.url + "/v1", json=[{"taskType": "ping", "ping": True}], headers=AUTH,
                              timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"flowgen serve did not answer within 60 s: {self.log_path.read_text()[-2000:]}")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def post(self, tasks: list) -> httpx.Response:
        return httpx.post(self.url + "/v1", json=tasks, headers=AUTH, timeout=60)

    def poll_until_done(self, task_uuid: str, deadline_s: float = 60) -> httpx.Response:
        deadline = time.monotonic() + deadline_s
        while True:
            response = self.post([{"taskType": "getResponse", "taskUUID": task_uuid}])
            body = response.json()
            if "errors" in body or body["data"][0].get("status") != "processing" or time.monotonic() > deadline:
                return response
            time.sleep(0.1)
