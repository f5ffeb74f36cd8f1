"""Server inputs: their own, lower pixel limit, and memory that comes back after large references
(issue 18, item 3: four 8000x8000 PNGs sent as references had pinned 1.5 GB in the server)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from tests.png_files import header_only_png, solid_png
from tests.serve.fake_app import KEY, make_app

ROOT = Path(__file__).parents[2]
AUTH = {"Authorization": f"Bearer {KEY}"}


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_an_input_over_the_servers_pixel_limit_is_refused_by_name(tmp_path):
    photo = header_only_png(tmp_path / "photo.png", 8000, 8000)  # 64 MP: a recipe may use it, a client may not
    with TestClient(make_app(tmp_path / "data"), base_url="http://testserver") as client:
        sent = {"taskType": "imageUpload", "taskUUID": "1f0b2ad5-3c4e-4a5b-9c6d-7e8f9a0b1c2d", "image": data_uri(photo)}
        response = client.post("/v1", json=[sent], headers=AUTH)
    assert response.status_code == 400, response.text
    (error,) = response.json()["errors"]
    assert (error["code"], error["parameter"], error["taskUUID"]) == ("invalidImage", "image", sent["taskUUID"])
    assert "8000x8000 (64,000,000 pixels); the limit is 50,000,000 pixels" in error["message"]


RSS_BOUND_MB = 150  # the loader's cache holds four 1 MP references (16 MiB); before the fix: four 49 MP ones

_SERVE = """
import base64, gc, json, sys, uuid
import psutil
from starlette.testclient import TestClient
from tests.serve.fake_app import KEY, make_app, task

auth = {"Authorization": f"Bearer " + KEY}
uris = ["data:image/png;base64," + base64.b64encode(open(p, "rb").read()).decode() for p in sys.argv[2:]]
process = psutil.Process()
with TestClient(make_app(sys.argv[1]), base_url="http://testserver") as client:
    assert client.post("/v1", json=[{"taskType": "ping", "ping": True}], headers=auth).status_code == 200
    gc.collect()
    before = process.memory_info().rss
    sent = task(inputs={"referenceImages": uris}, seed=1)
    response = client.post("/v1", json=[sent], headers=auth)
    assert response.status_code == 200, response.text
    gc.collect()
    after = process.memory_info().rss
print(json.dumps({"before": before, "after": after}))
"""


@pytest.mark.slow
def test_serving_four_49mp_references_leaves_rss_bounded(tmp_path):
    # 7000x7000 = 49 MP: just under the server's limit, 196 MB each as decoded RGB
    paths = [solid_png(tmp_path / f"ref{i}.png", 7000, 7000, (30 * i, 90, 160)) for i in range(4)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", _SERVE, str(tmp_path / "data"), *map(str, paths)], check=False,
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    grown_mb = (measured["after"] - measured["before"]) / 2**20
    assert grown_mb < RSS_BOUND_MB, f"the server's RSS grew {grown_mb:.0f} MB (bound {RSS_BOUND_MB} MB)"
