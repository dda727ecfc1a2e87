"""`dfm serve` in a real browser (Debian's chromium driven by playwright), and its API's answers to bad requests."""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
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
    headers = {"Content-Type": "application/json"} if headers is None else headers
    req = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("serve") / "run"
    assert cli(["train", "--out", str(run), "--steps", "3", "--batch-size", "4", "--no-progress", *TINY]) == 0
    return run


@pytest.fixture(scope="module")
def server(run):
    with running_server(run, threads=1) as url:
        yield url


@pytest.fixture(scope="module")
def live(run):
    """The app under uvicorn in a thread of this process, so that a test sees its jobs (``Server.jobs``); jobs whose
    event stream is not opened are dropped after 1 s here (30 s by default)."""
    import uvicorn

    from dfm.serve import create_app

    port = _free_port()
    app = create_app(run, host="127.0.0.1", port=port)
    state = app.state.server
    state.open_timeout = state.keep_finished = 1.0
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    assert _wait(lambda: uv.started, 60)
    yield f"http://127.0.0.1:{port}", state
    uv.should_exit = True
    thread.join(30)


@pytest.fixture
def page():
    """A page of Debian's chromium, driven by playwright (no browser download)."""
    if CHROMIUM is None:
        pytest.skip("no chromium browser (apt-get install chromium, or set DFM_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the browser is Debian's)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield browser.new_page()
        browser.close()


def test_api_refuses_bad_requests_and_keeps_serving(server):
    status, info = _request(f"{server}/api/info")
    assert status == 200 and info["stages"] == 2 and info["classes"][3] == "Dress"
    assert info["solver"] == "heun" and info["solvers"] == ["euler", "heun"]  # the run's own solver is the default
    assert info["shift"] == 1.0 and info["shift_from"] == 0
    assert info["thresholds"] == [0.9] and info["thresholds_apply"] is True  # DFM's jumps (not Pyramidal Flow's)
    bad = [
        (b'{"shift": 0}', 422, "sampler.shift=0"),
        (b'{"shift": 0.3, "shift_from": 2}', 422, "sampler.shift_from=2: give a stage of the model's 2"),
        (b'{"shift": "much"}', 422, "shift"),
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


def test_page_shows_the_stage_preview_before_the_final_image(server, page):
    page.goto(server)
    page.wait_for_function("document.querySelectorAll('#class_label option').length === 11")
    assert page.input_value("#steps") == "3,2" and page.input_value("#solver") == "heun"
    assert page.input_value("#shift") == "1" and page.input_value("#shift_from") == "0"
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
    assert _request(f"{server}/api/info")[0] == 200


def test_page_greys_out_the_thresholds_of_a_three_stage_pyramidal_flow_and_samples_it(tmp_path, page):
    """Pyramidal Flow has no thresholds: its run keeps the preset's one value for three stages, the page shows it
    greyed out and sends it back unchanged, and the server samples; another value is refused by the API."""
    run = tmp_path / "pyramidal"
    assert cli(["train", "--method", "pyramidal", "--out", str(run), "--steps", "2", "--batch-size", "4",
                "--no-progress", *TINY_RUN, "-o", "method.stages=3", "-o", "sampler.steps=2,2,2"]) == 0  # fmt: skip
    with running_server(run, threads=1) as url:
        assert _request(f"{url}/api/info")[1]["thresholds_apply"] is False
        status, reply = _request(f"{url}/api/generate", b'{"seeds": [0], "thresholds": [0.5, 0.8]}')
        assert status == 422 and "does not use them" in reply["error"]
        page.goto(url)
        page.wait_for_function("document.querySelectorAll('#class_label option').length === 11")
        assert page.is_disabled("#thresholds") and page.get_attribute("#thresholds", "title").startswith("pyramidal")
        page.fill("#seeds", "0-1")
        page.click("#generate")
        page.wait_for_selector("#final[data-final='1']", timeout=120_000)
        assert page.text_content("#error") == ""
        assert page.eval_on_selector_all("img.preview", "els => els.map(e => +e.dataset.stage)") == [0, 1, 2]


def test_video_runs_stream_clips(tmp_path):
    run = tmp_path / "video"
    assert cli(["train", "--preset", "video-quickstart", "--out", str(run), "--steps", "2", "--batch-size", "4",
                "--no-progress", *TINY, "-o", "data.num_clips=16", "-o", "data.frames=4"]) == 0  # fmt: skip
    from fastapi.testclient import TestClient

    from dfm.serve import create_app

    with TestClient(create_app(run), base_url="http://127.0.0.1:7860") as client:  # the app's default address
        job = client.post("/api/generate", json={"num_images": 2, "seeds": [0, 1]}).json()["job"]
        events = client.get(f"/api/jobs/{job}/events").text
    payloads = {kind: json.loads(data) for kind, data in
                (block.split("\ndata: ", 1) for block in events.strip().split("\n\n"))}  # fmt: skip
    kinds = [block.split("\n")[0][7:] for block in events.strip().split("\n\n")]
    assert "event: done" in events and kinds.count("stage") == 2
    assert payloads["event: done"]["image"].startswith("data:image/gif;base64,")
    assert payloads["event: progress"]["total"] == 5  # the video preset samples with Euler, 3 + 2 steps here
    assert payloads["event: stage"]["image"].startswith("data:image/gif;base64,")


# -- issue 24: the security review of `dfm serve`


def test_other_web_pages_cannot_use_the_server(server):
    """A cross-site "simple" POST (text/plain, no preflight), another page's Origin, another Host (DNS rebinding)."""
    port = urllib.parse.urlsplit(server).port
    job = json.dumps({"num_images": 1, "steps": [3, 2]}).encode()
    status, reply = _request(f"{server}/api/generate", job, {"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in reply["error"], (status, reply)
    assert _request(f"{server}/api/generate", job, {})[0] == 415  # urllib's default, a form
    evil = {"Content-Type": "application/json", "Origin": "http://evil.example"}
    status, reply = _request(f"{server}/api/generate", job, evil)
    assert status == 403 and "Origin" in reply["error"], (status, reply)
    assert _request(f"{server}/api/jobs/nope/cancel", b"", evil)[0] == 403
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1:1", ""):
        status, reply = _request(f"{server}/api/info", None, {"Host": host})
        assert status == 403 and "Host" in reply["error"], (host, status, reply)
        assert _request(server, None, {"Host": host})[0] == 403  # the page too
    ours = {"Content-Type": "application/json; charset=utf-8", "Origin": server, "Host": f"localhost:{port}"}
    status, reply = _request(f"{server}/api/generate", b'{"steps": [0, 2]}', ours)  # past the guard, to the checks
    assert status == 422 and "sampler.steps=0,2" in reply["error"], (status, reply)
    assert _request(f"{server}/api/info")[0] == 200


def _connect(url: str) -> socket.socket:
    parts = urllib.parse.urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=30)


def _status(sock: socket.socket) -> tuple[int, bytes]:
    """The status and the whole reply, read until the server closes the connection."""
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    return int(reply.split(b" ", 2)[1]), reply


def test_body_limit_counts_the_bytes_of_a_chunked_body(server):
    host = urllib.parse.urlsplit(server).netloc.encode()
    head = (b"POST /api/generate HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" % host)  # fmt: skip
    chunk = b"%x\r\n%s\r\n" % (4096, b" " * 4096)
    # 20 KB, then nothing more (the body never ends): the server answers as soon as it has passed 16 KB
    with _connect(server) as sock:
        sock.sendall(head + chunk * 5)
        status, reply = _status(sock)
        assert status == 413 and b"request too large" in reply, reply
    # 200 MB offered: the server stops the connection long before
    big, sent = b"%x\r\n%s\r\n" % (2**20, b" " * 2**20), 0
    with _connect(server) as sock:
        sock.sendall(head)
        try:
            while sent < 200 * 2**20:
                sock.sendall(big)
                sent += 2**20
                if select.select([sock], [], [], 0)[0]:  # the answer came
                    break
        except OSError:  # the server closed the connection: the rest of the body was never read
            pass
    assert sent < 32 * 2**20, f"{sent / 2**20:.0f} MB of the body were read"
    assert _request(f"{server}/api/info")[0] == 200


def test_deeply_nested_body_is_refused_with_a_message(server):
    for body in (b"[" * 10_000, b'{"seeds": ' + b"[" * 5_000 + b"0" + b"]" * 5_000 + b"}", b"{" * 9 + b"}" * 9):
        status, reply = _request(f"{server}/api/generate", body)
        assert status == 422 and "nested too deeply" in reply["error"], (body[:20], status, reply)
    status, reply = _request(f"{server}/api/generate", b'{"seeds": [["[[[[[[[[[[[[[["]]}')  # brackets in a string
    assert status == 422 and "seeds.0" in reply["error"], reply
    assert _request(f"{server}/api/info")[0] == 200


def _open_stream(url: str, job: str) -> socket.socket:
    """The job's event stream on a plain socket, read until its first progress event (the job runs)."""
    sock = _connect(url)
    sock.sendall(f"GET /api/jobs/{job}/events HTTP/1.1\r\nHost: {urllib.parse.urlsplit(url).netloc}\r\n\r\n".encode())
    seen = b""
    while b"event: progress" not in seen:
        chunk = sock.recv(65536)
        assert chunk, seen
        seen += chunk
    assert seen.startswith(b"HTTP/1.1 200"), seen
    return sock


def _ended_cancelled(job) -> bool:
    """Whether the last event the job sent (to nobody now) says it was cancelled, rather than done."""
    return _wait(lambda: [kind for kind, _ in list(job.events._queue)][-1:] == ["cancelled"], 5)


def test_closing_the_event_stream_cancels_the_job(live):
    url, state = live
    status, reply = _request(f"{url}/api/generate", json.dumps({"num_images": 16, "steps": [200, 200]}).encode())
    assert status == 200
    job = state.jobs[reply["job"]]
    _open_stream(url, job.id).close()  # the page closed or reloaded
    assert _wait(lambda: job.cancel.is_set() and not state.jobs.copy(), 5), state.jobs
    assert _wait(lambda: state.watched.job is None, 5)  # the worker let go of it
    assert _ended_cancelled(job)  # stopped, not run to its end
    # the queue is free: the next job runs at once
    status, reply = _request(f"{url}/api/generate", json.dumps({"num_images": 1, "steps": [3, 2]}).encode())
    tic = time.monotonic()
    with urllib.request.urlopen(f"{url}/api/jobs/{reply['job']}/events", timeout=30) as stream:
        assert b"event: done" in stream.read()
    assert time.monotonic() - tic < 5
    assert _wait(lambda: not state.jobs.copy(), 2)  # read to its end: dropped with its images


def test_one_page_reads_a_job(live):
    url, state = live
    status, reply = _request(f"{url}/api/generate", json.dumps({"num_images": 16, "steps": [200, 200]}).encode())
    with _open_stream(url, reply["job"]):
        status, answer = _request(f"{url}/api/jobs/{reply['job']}/events")
        assert status == 409 and "already being read" in answer["error"]
    assert _wait(lambda: not state.jobs.copy(), 5)


def test_a_job_whose_stream_is_never_opened_is_dropped(live):
    url, state = live  # open_timeout 1 s here
    started = []
    for body in ({"num_images": 16, "steps": [200, 200]}, {"num_images": 1, "steps": [3, 2]}):
        status, reply = _request(f"{url}/api/generate", json.dumps(body).encode())
        assert status == 200
        started.append(state.jobs[reply["job"]])
    assert _wait(lambda: not state.jobs.copy(), 10), state.jobs
    assert all(job.cancel.is_set() for job in started)
    assert _wait(lambda: state.watched.job is None, 5)
    assert _request(f"{url}/api/jobs/{started[1].id}/events")[0] == 404  # its events and images are gone


def test_beyond_the_loopback_the_server_needs_a_flag_and_a_token(run):
    port = _free_port()
    refused = subprocess.run([sys.executable, "-m", "dfm", "serve", str(run), "--host", "0.0.0.0", "--port",
                              str(port)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode == 2 and "--allow-remote" in refused.stderr, refused
    proc = subprocess.Popen([sys.executable, "-m", "dfm", "serve", str(run), "--host", "0.0.0.0", "--allow-remote",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        line = proc.stdout.readline()
        printed = [w for w in line.split() if w.startswith(f"http://127.0.0.1:{port}/?token=")]
        assert printed, line
        token = urllib.parse.parse_qs(urllib.parse.urlsplit(printed[0]).query)["token"][0]
        url = f"http://127.0.0.1:{port}"
        assert _wait(lambda: _answers(url, token), 60)
        status, reply = _request(f"{url}/api/info")
        assert status == 403 and "token" in reply["error"], (status, reply)
        assert _request(f"{url}/api/info", None, {"X-DFM-Token": token + "x"})[0] == 403
        assert _request(f"{url}/api/info", None, {"X-DFM-Token": token, "Host": f"evil.example:{port}"})[0] == 403
        status, reply = _request(f"{url}/api/generate", b'{"steps": [0, 2]}',
                                 {"Content-Type": "application/json", "X-DFM-Token": token})  # fmt: skip
        assert status == 422 and "steps" in reply["error"]
        # a browser: the printed URL sets a cookie, which the page's requests then carry
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        with browser.open(printed[0], timeout=30) as res:
            assert res.status == 200 and res.url == f"{url}/" and b"dfm serve" in res.read()
        with browser.open(f"{url}/api/info", timeout=30) as res:
            assert json.loads(res.read())["stages"] == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _answers(url: str, token: str) -> bool:
    try:
        return _request(f"{url}/api/info", None, {"X-DFM-Token": token})[0] == 200
    except OSError:
        return False


def test_page_checks_seeds_and_its_job_ends_with_the_page(live, page):
    url, state = live
    page.goto(url)
    page.wait_for_function("document.querySelectorAll('#class_label option').length === 11")
    refused = [("1,,2", "empty entry"), ("1,2,", "empty entry"), ("0-2147483647", "at most 16 images"),
               ("2147483648", "from 0 to 2147483647"), ("3-1", "goes down"), ("1.5", "1.5"), ("-1", "-1"),
               ("0-15,16", "at most 16 images")]  # fmt: skip
    for text, message in refused:
        page.fill("#seeds", text)
        tic = time.monotonic()
        page.click("#generate")
        page.wait_for_function(f"document.querySelector('#error').textContent.includes({json.dumps(message)})",
                               timeout=3000)  # fmt: skip
        assert time.monotonic() - tic < 3 and page.is_enabled("#generate") and not state.jobs.copy(), text
    assert page.evaluate("parseSeeds(' 0-3, 7 ', 16)") == [0, 1, 2, 3, 7]  # the page's parser, as a unit
    assert page.evaluate("parseSeeds('', 16)") is None  # random seeds
    page.fill("#steps", "3,,2")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#error').textContent.includes('steps: an empty entry')")
    # Cancel: the caption says so
    page.fill("#seeds", "0-15")
    page.fill("#steps", "200,200")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#timeline').textContent.includes('network evaluations')")
    page.click("#cancel")
    page.wait_for_function("document.querySelector('#final_caption').textContent.startsWith('cancelled')")
    assert page.is_enabled("#generate")
    assert _wait(lambda: not state.jobs.copy(), 5)
    # reloading the page in the middle of a job cancels it on the server
    page.click("#generate")
    page.wait_for_function("document.querySelector('#timeline').textContent.includes('network evaluations')")
    (job,) = state.jobs.copy().values()
    page.reload()
    assert _wait(lambda: job.cancel.is_set() and not state.jobs.copy(), 5), state.jobs
    assert _wait(lambda: state.watched.job is None, 5) and _ended_cancelled(job)


# -- issue 26: stop at a stage, finish the picked ones, vary the detail


def _events(client, job: str) -> dict:
    """The payload of each kind of event of a job (the last one of each kind)."""
    text = client.get(f"/api/jobs/{job}/events").text
    return {block.split("\n")[0][7:]: json.loads(block.split("\ndata: ", 1)[1]) for block in text.strip().split("\n\n")}


def _pixels(data_url: str):
    import base64
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))).astype(int)


def test_api_stops_at_a_stage_refines_the_picked_and_varies_the_detail():
    from fastapi.testclient import TestClient

    from dfm.serve import create_app

    fixtures = os.path.join(os.path.dirname(__file__), "fixtures", "format1")
    with TestClient(create_app(os.path.join(fixtures, "dfm")), base_url="http://127.0.0.1:7860") as client:
        assert client.get("/api/info").json()["decomposed"] is True
        job = client.post("/api/generate", json={"seeds": [0, 1, 2], "until_stage": 1}).json()["job"]
        stopped = _events(client, job)["done"]
        assert stopped["stopped"] == 1 and stopped["job"] == job and len(stopped["tiles"]) == 3
        job = client.post("/api/refine", json={"job": job, "seeds": [2, 0]}).json()["job"]
        events = _events(client, job)
        finished = events["done"]
        assert finished["seeds"] == [2, 0] and finished["stopped"] is None and len(finished["tiles"]) == 2
        assert events["stage"]["stage"] == 1  # only the stage left was sampled
        watched = client.app.state.server.watched
        assert events["progress"]["total"] == watched.calls == 9  # the fixture's Heun 15,5 steps: 2 * 5 - 1
        alone = _events(client, client.post("/api/generate", json={"seeds": [2, 0]}).json()["job"])["done"]
        for a, b in zip(finished["tiles"], alone["tiles"], strict=True):  # what an uninterrupted sampling gives
            assert abs(_pixels(a) - _pixels(b)).max() <= 1
        # variations: same coarse level as seed 2's image, new detail
        job = client.post("/api/vary", json={"seed": 2, "num_images": 3}).json()["job"]
        varied = _events(client, job)["done"]
        assert len(varied["tiles"]) == 3 and varied["labels"] == [alone["labels"][0]] * 3
        tiles = [_pixels(t).astype(float) for t in varied["tiles"]]
        assert max(abs(a - b).mean() for a in tiles for b in tiles) > 1  # the detail differs
        bad = [
            ("/api/refine", {"job": "nope", "seeds": [0]}, "no stopped samplings of that job"),
            ("/api/refine", {"job": stopped["job"], "seeds": [7]}, "[7] were not in that job"),
            ("/api/refine", {"job": stopped["job"], "seeds": []}, "seeds"),
            ("/api/generate", {"until_stage": 2}, "this model has 2 stages; choose 1"),
            ("/api/vary", {"seed": 0, "keep": 2}, "keep 1 to 1 coarse levels"),
            ("/api/vary", {"seed": -1}, "seed"),
        ]
        for url, body, message in bad:
            reply = client.post(url, json=body)
            assert reply.status_code == 422 and message in reply.json()["error"], (url, body, reply.json())
    with TestClient(create_app(os.path.join(fixtures, "fm")), base_url="http://127.0.0.1:7860") as client:
        assert client.get("/api/info").json()["decomposed"] is False
        for url, body in (("/api/generate", {"until_stage": 1}), ("/api/vary", {"seed": 0})):
            reply = client.post(url, json=body)
            assert reply.status_code == 422 and "one-stage Flow Matching" in reply.json()["error"], reply.json()


def test_page_finishes_the_clicked_tiles_and_varies_one(server, page):
    page.goto(server)
    page.wait_for_function("document.querySelectorAll('#until_stage option').length === 2")
    page.fill("#seeds", "4-7")
    page.select_option("#until_stage", "1")
    page.click("#generate")
    page.wait_for_selector("#refine", timeout=120_000)
    assert page.eval_on_selector_all("#tiles figure", "els => els.map(e => +e.dataset.seed)") == [4, 5, 6, 7]
    assert page.is_disabled("#refine") and "stopped after stage 1 of 2" in page.text_content("#final_caption")
    page.click("#tiles figure[data-seed='5'] img")
    page.click("#tiles figure[data-seed='7'] img")
    page.click("#tiles figure[data-seed='5'] img")  # a second click lets it go
    page.click("#tiles figure[data-seed='6'] img")
    assert page.text_content("#refine") == "Finish selected (2)"
    page.click("#refine")
    page.wait_for_selector("#final[data-final='1']", timeout=120_000)
    assert page.eval_on_selector_all("img.preview", "els => els.map(e => +e.dataset.stage)") == [1]
    assert page.eval_on_selector_all("#tiles figure", "els => els.map(e => +e.dataset.seed)") == [6, 7]
    assert "2 image(s) of 28x28, seeds 6, 7" in page.text_content("#final_caption")
    page.fill("#num_images", "3")
    page.click("#tiles figure[data-seed='7'] button.vary")
    page.wait_for_selector("#final[data-final='1']", timeout=120_000)
    assert page.eval_on_selector_all("#tiles img", "els => els.filter(e => e.naturalWidth > 0).length") == 3
    assert "3 image(s) of 28x28" in page.text_content("#final_caption")
    assert "variations" not in page.text_content("#error") and page.text_content("#error") == ""
    page.click("#tiles figure:first-child button.vary")  # varying a variation: seed 7's coarse level again
    page.wait_for_selector("#final[data-final='1']", timeout=120_000)
    assert page.eval_on_selector_all("#tiles figure", "els => els.length") == 3
    assert _request(f"{server}/api/info")[0] == 200
