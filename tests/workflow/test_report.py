"""`flowgen report`: the HTML contact sheet of an output folder, read as text and opened in Chromium.

One small folder is rendered with the FakeEngine for the whole module: ok results (one with an
HTML-looking prompt), a result failed by an unreadable reference, one by an engine error, one
skipped by --fail-fast, one ok result whose file was deleted, a pending upload, a failed webhook,
a content-check verdict and two canary checks (passed, then drifted).
"""

from __future__ import annotations

import base64
import io
import shutil
from html.parser import HTMLParser
from urllib.parse import unquote

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from flowgen.cli import main as cli
from flowgen.report.thumbnails import THUMBNAIL_SIDE, thumbnail_data_uri
from flowgen.run.engine import FakeEngine
from flowgen.run.executor import against_folder, execute
from flowgen.run.manifest import Manifest
from tests.workflow.direct_runs import item, plan_of, reference

TRICKY_PROMPT = 'red <b>sneaker</b> & "laces" <script>alert(1)</script>'


class Boom(FakeEngine):
    """Fails every batch 80 pixels wide."""

    def generate_batch(self, request):
        if request.width == 80:
            raise RuntimeError("out of device memory")
        return super().generate_batch(request)


class Tags(HTMLParser):
    """Every start tag with its attributes."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))


def tags_of(html: str) -> list[tuple[str, dict[str, str]]]:
    parser = Tags()
    parser.feed(html)
    return parser.tags


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The rendered output folder and what the report must show of it."""
    tmp = tmp_path_factory.mktemp("report")
    out = tmp / "out"
    bad = tmp / "broken-packshot.png"
    bad.write_bytes(b"\x89PNG not really")
    good = reference(tmp)
    execute(against_folder(plan_of([item("a-tricky", refs=(good,), positivePrompt=TRICKY_PROMPT), item("b-bad", refs=(bad,)),
                     item("c-two", numberResults=2)], out)), FakeEngine())
    # a second run, stopped by --fail-fast when e-boom's batch (the first) failed: d-wide never ran
    execute(against_folder(plan_of([item("e-boom", width=80), item("d-wide", width=96)], out)), Boom(), fail_fast=True)
    with Manifest(out) as manifest:
        records = {(r["item_key"], r["result_index"]): r for r in manifest.records()}
        (out / records[("c-two", 1)]["output"]["path"]).unlink()  # an ok result whose file went away
        a = records[("a-tricky", 0)]
        manifest.set_delivery(a["item_id"], 0, "upload", "pending", target="https://bucket.example/a-tricky_0.png")
        c = records[("c-two", 0)]
        manifest.set_delivery(c["item_id"], 0, "webhook", "failed", target="https://hooks.example/flowgen",
                              error="HTTP 503 after 5 attempts", attempts=5)
        manifest.set_delivery(c["item_id"], 1, "webhook", "ok", target="https://hooks.example/flowgen", attempts=1)
        checked = {**c, "safety": {"NSFWContent": False, "threshold": 0.5, "flagged": [], "detections": []}, "NSFWContent": False}
        manifest.upsert([checked])
        verdict = {"item_id": a["item_id"], "result_index": 0, "item_key": "a-tricky", "threshold_db": 40.0,
                   "engine": {"dtype": "float32"}, "first_engine": {"dtype": "float32"}}
        manifest.record_canary([{**verdict, "run_id": "night-1", "psnr_db": None, "passed": True, "changed": None,
                                 "checked_at": 1.0e9}])
        manifest.record_canary([{**verdict, "run_id": "night-2", "psnr_db": 31.46, "passed": False,
                                 "engine": {"dtype": "bfloat16"}, "changed": "dtype: float32 -> bfloat16",
                                 "checked_at": 1.0e9 + 86400}])
    statuses = {key: r["status"] for key, r in records.items()}
    assert statuses == {("a-tricky", 0): "ok", ("b-bad", 0): "failed", ("c-two", 0): "ok", ("c-two", 1): "ok",
                        ("d-wide", 0): "skipped", ("e-boom", 0): "failed"}
    return {"out": out, "records": records}


def report(args) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["report", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def html(folder):
    code, stdout, _ = report([folder["out"]])
    assert code == 0 and stdout.strip() == str(folder["out"] / "report.html")
    return (folder["out"] / "report.html").read_text(encoding="utf-8")


def test_report_shows_every_item_result_and_failure_reason(folder, html):
    for key, _index in folder["records"]:
        assert f">{key}<" in html
    assert 'broken-packshot.png: is not a readable image' in html  # b-bad's reason
    assert "engine error: RuntimeError: out of device memory" in html  # e-boom's
    assert "not run: --fail-fast stopped the run" in html  # d-wide's reason
    assert "file missing" in html and "img/c-two_1.png" in html
    assert "HTTP 503 after 5 attempts" in html and "NSFW check: clean" in html
    # the latest canary check (night-2) in the table, with what changed; the earlier one counted
    assert "run night-2" in html and "2 checks so far, 1 failed" in html
    assert "31.5 dB" in html and "dtype: float32 -&gt; bfloat16" in html and '<span class="badge fail">fail</span> 31.5 dB' in html
    cards = [attrs for tag, attrs in tags_of(html) if tag == "article"]
    assert sorted(c["data-status"] for c in cards) == ["failed", "failed", "ok", "ok", "ok", "skipped"]
    assert sum(c["data-delivery"] == "pending" for c in cards) == 2  # a pending upload, a webhook that gave up
    with Manifest(folder["out"]) as manifest:
        runs = manifest.runs()
    assert len(runs) == 2 and all(f">{run['run_id']}<" in html for run in runs)  # the run list


def test_prompt_text_is_escaped(html):
    assert TRICKY_PROMPT not in html and "<script>alert(1)" not in html
    assert "red &lt;b&gt;sneaker&lt;/b&gt; &amp; &#34;laces&#34; &lt;script&gt;alert(1)&lt;/script&gt;" in html
    scripts = [attrs for tag, attrs in tags_of(html) if tag == "script"]
    assert scripts == [{}]  # only the report's own inline filter script


def test_report_loads_nothing_from_anywhere_and_links_resolve(folder, tmp_path):
    target = tmp_path / "elsewhere" / "sheet.html"
    code, stdout, _ = report([folder["out"], "-o", target])
    assert code == 0 and stdout.strip() == str(target)
    tags = tags_of(target.read_text(encoding="utf-8"))
    urls = [v for _, attrs in tags for k, v in attrs.items() if k in ("src", "href")]
    assert urls and not [u for u in urls if u.startswith(("http:", "https:", "//"))]
    assert not [t for t, attrs in tags if t in ("link", "iframe", "object", "embed") or (t == "script" and attrs.get("src"))]
    images = [attrs["src"] for tag, attrs in tags if tag == "img"]
    assert len(images) == 2  # a-tricky#0 and c-two#0: the others failed, were skipped or lost their file
    for src in images:
        assert src.startswith("data:image/jpeg;base64,")
        assert Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).format == "JPEG"
    links = [attrs["href"] for tag, attrs in tags if tag == "a"]
    assert len(links) == 2 and all((target.parent / unquote(href)).resolve().is_file() for href in links)


def test_thumbnails_are_small_jpegs_and_unreadable_files_give_none(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, size=(768, 1024, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "big.png")
    uri = thumbnail_data_uri(tmp_path / "big.png")
    thumb = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert thumb.format == "JPEG" and thumb.size == (THUMBNAIL_SIDE, THUMBNAIL_SIDE * 3 // 4)
    (tmp_path / "junk.webp").write_bytes(b"RIFF....WEBPjunk")
    assert thumbnail_data_uri(tmp_path / "junk.webp") is None


def test_empty_manifest(tmp_path):
    out = tmp_path / "out"
    Manifest(out).close()
    assert report([out])[0] == 0
    html = (out / "report.html").read_text()
    assert "No results in this folder's manifest yet." in html and "<article" not in html and "canary" not in html
    assert "No runs recorded." in html


def test_missing_manifest_is_a_one_line_error_that_writes_nothing(tmp_path):
    code, _, stderr = report([tmp_path])
    assert code == 2 and stderr.strip() == f"error: {tmp_path}: no flowgen manifest here (.flowgen/manifest.sqlite is missing)"
    assert list(tmp_path.iterdir()) == []
    code, _, stderr = report([tmp_path / "nope"])
    assert code == 2 and "nope: no such output folder" in stderr and "Traceback" not in stderr


def test_unwritable_target_and_corrupt_manifest_are_one_line_errors(folder, tmp_path):
    (tmp_path / "a-file").write_text("x")
    code, _, stderr = report([folder["out"], "-o", tmp_path / "a-file" / "report.html"])
    assert code == 2 and stderr.startswith(f"error: {tmp_path / 'a-file' / 'report.html'}: cannot write the report")
    assert len(stderr.strip().splitlines()) == 1 and (tmp_path / "a-file").read_text() == "x"
    broken = tmp_path / "broken"
    (broken / ".flowgen").mkdir(parents=True)
    (broken / ".flowgen" / "manifest.sqlite").write_bytes(b"this is not sqlite" * 100)
    code, _, stderr = report([broken])
    assert code == 2 and "manifest.sqlite: not a readable flowgen manifest" in stderr and len(stderr.strip().splitlines()) == 1


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow  # a real browser
def test_report_in_headless_chromium(folder, html, tmp_path):
    binary = chromium()
    if binary is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    report_file = folder["out"] / "report.html"
    problems, requests = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=binary, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(report_file.resolve().as_uri(), wait_until="load")
            for image in page.locator("img").all():  # thumbnails load lazily: bring each into view
                image.scroll_into_view_if_needed()
            page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=10_000)
            loaded = page.evaluate("Array.from(document.images).map(i => i.naturalWidth)")
            assert len(loaded) == 2 and all(width > 0 for width in loaded), loaded

            shot = tmp_path / "report.png"
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(shot), full_page=True)
            pixels = np.asarray(Image.open(shot).convert("RGB"))
            colours = np.unique(pixels.reshape(-1, 3).astype(np.int32) @ np.array([65536, 256, 1], np.int32))
            assert pixels.std() > 20 and len(colours) > 100  # text, badges and noise-art thumbnails: not blank

            visible = lambda: page.eval_on_selector_all(  # noqa: E731
                ".card", "cs => cs.filter(c => c.offsetParent !== null).map(c => c.dataset.status)")
            assert sorted(visible()) == ["failed", "failed", "ok", "ok", "ok", "skipped"]
            page.click('button[data-filter="failed"]')
            assert visible() == ["failed", "failed"]
            shown_items = page.eval_on_selector_all(".item", "xs => xs.filter(x => !x.hidden).map(x => x.dataset.item)")
            failed_items = {folder["records"][(key, 0)]["item_id"] for key in ("b-bad", "e-boom")}
            assert sorted(shown_items) == sorted(failed_items)  # items without a match are hidden too
            page.click('button[data-filter="skipped"]')
            assert visible() == ["skipped"]
            page.click('button[data-filter="pending"]')
            assert visible() == ["ok", "ok"] and page.locator("#empty").is_hidden()
            page.click('button[data-filter="all"]')
            assert len(visible()) == 6
        finally:
            browser.close()
    assert problems == []
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []
