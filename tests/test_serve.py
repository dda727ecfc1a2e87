"""`dfm serve` in a real browser (Debian's chromium driven by playwright), and its API's answers to bad requests."""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi", reason="dfm serve needs fastapi and uvicorn (pip install 'dfm[serve]')")
pytest.importorskip("uvicorn", reason="dfm serve needs fastapi and uvicorn (pip install 'dfm[serve]')")

from dfm.cli import main as cli  # noqa: E402
from dfm.serve import running_server  # noqa: E402
from helpers import TINY_RUN, needs_data  # noqa: E402

pytestmark = needs_data
CHROMIUM = os.environ.get("DFM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
TINY = [*TINY_RUN, "-o", "sampler.steps=3,2"]


def _request(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers=headers or {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run = tmp_path_factory.mktemp("serve") / "run"
    assert cli(["train", "--out", str(run), "--steps", "3", "--batch-size", "4", "--no-progress", *TINY]) == 0
    with running_server(run, threads=1) as url:
        yield url


def test_api_refuses_bad_requests_and_keeps_serving(server):
    status, info = _request(f"{server}/api/info")
    assert status == 200 and info["stages"] == 2 and info["classes"][3] == "Dress"
    assert info["solver"] == "heun" and info["solvers"] == ["euler", "heun"]  # the run's own solver is the default
    bad = [
        (b'{"steps": [0, 2]}', 422, "sampler.steps=0,2: every stage needs at least 1 step"),
        (b'{"steps": [201, 2]}', 422, "steps: at most 200 per stage"),
        (b'{"num_images": 1000}', 422, "num_images"),
        (b'{"class_label": 12}', 422, "class: this model has classes 0..9"),
        (b'{"path": "/etc/passwd"}', 422, "path"),
        (b'{"thresholds": [1.5]}', 422, "thresholds"),
        (b"not json", 422, "Expecting value"),
        (b"[" * 20_000, 413, "request too large"),
    ]
    for body, code, message in bad:
        status, reply = _request(f"{server}/api/generate", body)
        assert status == code and message in reply["error"], (body[:30], status, reply)
    assert _request(f"{server}/api/jobs/nope/cancel", b"")[0] == 404
    assert _request(f"{server}/api/info")[0] == 200  # still serving


def test_cancel_stops_the_job_on_the_server(server):
    status, reply = _request(f"{server}/api/generate", json.dumps({"num_images": 16, "steps": [200, 200]}).encode())
    assert status == 200
    job = reply["job"]
    kinds, totals = [], []
    with urllib.request.urlopen(f"{server}/api/jobs/{job}/events", timeout=120) as stream:
        for line in stream:
            line = line.decode().strip()
            if line.startswith("data: ") and kinds[-1:] == ["progress"]:
                totals.append(json.loads(line[6:])["total"])
            if line.startswith("event: "):
                kinds.append(line[7:])
                if kinds[-1] == "progress" and kinds.count("progress") == 1:
                    assert _request(f"{server}/api/jobs/{job}/cancel", b"")[0] == 200
                if kinds[-1] in ("done", "cancelled", "error"):
                    break
    assert kinds[-1] == "cancelled" and "stage" not in kinds  # stopped long before stage 1's 200 steps
    assert set(totals) == {2 * 400 - 1}  # the run's solver, Heun, whose last step is an Euler step
    assert _request(f"{server}/api/info")[0] == 200


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium browser (apt-get install chromium, or set DFM_CHROMIUM)")
def test_page_shows_the_stage_preview_before_the_final_image(server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the browser is Debian's)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(server)
        page.wait_for_function("document.querySelectorAll('#class_label option').length === 11")
        assert page.input_value("#steps") == "3,2" and page.input_value("#solver") == "heun"
        page.fill("#seeds", "0-3")
        page.click("#generate")
        page.wait_for_selector("#final[data-final='1']", timeout=120_000)
        previews = page.eval_on_selector_all("img.preview", "els => els.map(e => [+e.dataset.stage, +e.dataset.at])")
        final_at = float(page.get_attribute("#final", "data-at"))
        assert [s for s, _ in previews] == [0, 1]
        assert previews[0][1] <= final_at  # the coarse preview reached the page before the final images
        assert page.evaluate("document.querySelector('#final').naturalWidth") > 0  # the PNG decodes
        assert "4 image(s) of 28x28, seeds 0, 1, 2, 3" in page.text_content("#final_caption")
        page.fill("#steps", "0,2")
        page.click("#generate")
        page.wait_for_function("document.querySelector('#error').textContent.includes('steps')")
        assert page.is_enabled("#generate")
        browser.close()
    assert _request(f"{server}/api/info")[0] == 200


def test_video_runs_stream_clips(tmp_path):
    run = tmp_path / "video"
    assert cli(["train", "--preset", "video-quickstart", "--out", str(run), "--steps", "2", "--batch-size", "4",
                "--no-progress", *TINY, "-o", "data.num_clips=16", "-o", "data.frames=4"]) == 0  # fmt: skip
    from fastapi.testclient import TestClient

    from dfm.serve import create_app

    with TestClient(create_app(run)) as client:
        job = client.post("/api/generate", json={"num_images": 2, "seeds": [0, 1]}).json()["job"]
        events = client.get(f"/api/jobs/{job}/events").text
    payloads = {kind: json.loads(data) for kind, data in
                (block.split("\ndata: ", 1) for block in events.strip().split("\n\n"))}  # fmt: skip
    kinds = [block.split("\n")[0][7:] for block in events.strip().split("\n\n")]
    assert "event: done" in events and kinds.count("stage") == 2
    assert payloads["event: done"]["image"].startswith("data:image/gif;base64,")
    assert payloads["event: progress"]["total"] == 5  # the video preset samples with Euler, 3 + 2 steps here
    assert payloads["event: stage"]["image"].startswith("data:image/gif;base64,")
