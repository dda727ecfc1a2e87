"""``dfm serve``: try a trained model in the browser, watching it generate coarse to fine.

FastAPI + uvicorn with server-sent events (a small, well-kept ASGI stack; the page needs one stream of events per
job, which SSE gives without a websocket protocol on either side). The page sends the settings, then receives one
event per stage as soon as that stage reaches its threshold (the stage's preview), progress events, and the final
images.

Safety. It binds 127.0.0.1 unless told otherwise; another address (``--host 0.0.0.0``) needs ``--allow-remote``, and
then every request needs the token printed at start (``?token=...`` in the URL, kept by the page as a cookie;
scripts send it as the ``X-DFM-Token`` header; plain HTTP, so an SSH tunnel is the safer way across an untrusted
network). Other web pages cannot use the server: a request whose ``Host`` or ``Origin`` header is not the server's
own address is refused (403, against cross-site requests and DNS rebinding), and a POST must be ``application/json``
(415: a browser does not send that cross-site without asking first). A request body is counted as it is read,
whatever its headers say, and refused past 16 KB (413) without reading the rest; a body nested more than a few
levels deep is refused (422). Every field is validated with bounds and a bad value gets a 4xx with a message the
page shows; the client never names a file. One job runs at a time, a few wait, more are refused (429). A job lives
only as long as its page: closing or reloading the page (its event stream) cancels it, a job whose stream is not
opened within 30 s is cancelled, and a job and its images are dropped once its last event is read or 30 s after it
ended. The model is loaded once and only read.

    dfm serve runs/quickstart            # then open http://127.0.0.1:7860
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.cookies
import io
import ipaddress
import json
import os
import random
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from torch import nn

from dfm.config import SOLVERS, SamplerConfig
from dfm.data.fashion_mnist import CLASS_NAMES as FASHION_NAMES
from dfm.generate import Generator
from dfm.run import Run
from dfm.visual import image_grid, upsample_to

MAX_IMAGES = 16
MAX_STEPS = 200
MAX_QUEUE = 4
MAX_BODY = 16_384  # bytes of a request body
MAX_DEPTH = 8  # levels of [ and { in a request body (the settings need 2)
OPEN_TIMEOUT = 30.0  # seconds a job waits for its page to open its event stream before it is cancelled
KEEP_FINISHED = 30.0  # seconds a finished job (and its images) waits for its events to be read
POLL = 0.5  # seconds between checks that a page reading a job's events is still there
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
WILDCARD = frozenset({"0.0.0.0", "::", ""})  # bind every address of the machine
TOKEN_HEADER = "x-dfm-token"


class GenerateRequest(BaseModel):
    """What the page may ask for; anything else is refused with a 422 and the offending field."""

    model_config = {"extra": "forbid"}

    class_label: int | None = Field(None, ge=0, le=100_000)
    seeds: list[int] | None = Field(None, max_length=MAX_IMAGES)
    num_images: int = Field(4, ge=1, le=MAX_IMAGES)
    guidance: list[float] | None = Field(None, min_length=1, max_length=8)  #: None: the run's own
    steps: list[int] | None = Field(None, min_length=1, max_length=8)
    thresholds: list[float] | None = Field(None, max_length=7)
    solver: str | None = None  #: None: the run's own (``sampler.solver``)


class Cancelled(Exception):
    """Raised inside the sampler when the page cancels its job."""


@dataclass
class Job:
    id: str
    request: GenerateRequest
    settings: SamplerConfig
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    attached: bool = False  #: a page asked for the event stream (a second one is refused)
    streamed: bool = False  #: the event stream started
    timers: list = field(default_factory=list)  #: the pending timeouts that would drop the job


class _Watched(nn.Module):
    """The model, counting network evaluations for the progress events and stopping when a job is cancelled."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.job: Job | None = None
        self.calls = 0
        self.on_call = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.job is not None and self.job.cancel.is_set():
            raise Cancelled
        self.calls += 1
        if self.on_call is not None:
            self.on_call(self.calls)
        return self.model(*args, **kwargs)


def _png(x: torch.Tensor, nrow: int) -> str:
    """A batch in [-1, 1] as one grid PNG, as a data URL; a batch of clips (N, C, T, H, W) as an animated GIF."""
    if x.dim() == 5:
        return _gif([image_grid(x[:, :, f].float(), nrow=nrow, pad=2) for f in range(x.shape[2])])
    grid = image_grid(x.float(), nrow=nrow, pad=2)
    buf = io.BytesIO()
    PIL.Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _gif(frames: list) -> str:
    imgs = [PIL.Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in frames]
    buf = io.BytesIO()
    imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=150, loop=0)
    return "data:image/gif;base64," + base64.b64encode(buf.getvalue()).decode()


class Server:
    """The loaded model and the job queue behind the app."""

    def __init__(self, run: str | Path, device: str = "cpu") -> None:
        opened = Run.open(run)
        network = opened.load_network(device=device).requires_grad_(False)
        self.watched = _Watched(network)
        self.generator = Generator(self.watched, opened.config, opened.spec, opened.decoder(device))
        self.cfg = opened.config
        self.shape = opened.spec.sample_shape
        self.num_classes = opened.spec.num_classes
        fashion = str(self.cfg.data.dataset).startswith("fashion-mnist") and self.num_classes == len(FASHION_NAMES)
        self.class_names = list(FASHION_NAMES) if fashion else [str(i) for i in range(self.num_classes)]
        self.jobs: dict[str, Job] = {}  #: jobs waiting, running, or finished and not yet read; nothing else
        self.waiting = 0
        self.lock = asyncio.Lock()
        self.tasks: set[asyncio.Task] = set()  # the jobs' tasks, held until they end
        self.open_timeout = OPEN_TIMEOUT
        self.keep_finished = KEEP_FINISHED

    def drop(self, job: Job) -> None:
        """Cancel ``job`` if it still waits or runs, and forget it with its events and images (event loop only)."""
        job.cancel.set()
        self.jobs.pop(job.id, None)
        for timer in job.timers:
            timer.cancel()
        job.timers.clear()

    def expire(self, job: Job) -> None:
        """The page never opened ``job``'s event stream: nobody will see it, so stop it."""
        if not job.streamed:
            self.drop(job)

    def info(self) -> dict:
        sampler = self.cfg.sampler
        return {"method": self.cfg.method.name, "stages": self.cfg.method.stages, "steps": list(sampler.steps),
                "thresholds": list(sampler.thresholds), "guidance": list(sampler.guidance), "solver": sampler.solver,
                "solvers": list(SOLVERS), "classes": self.class_names,
                "limits": {"images": MAX_IMAGES, "steps": MAX_STEPS, "queue": MAX_QUEUE},
                "video": len(self.shape) == 4, "previews_exact": self.generator.previews_exact}  # fmt: skip

    def check(self, r: GenerateRequest) -> SamplerConfig:
        """The request's sampler settings (checked where every front end's are, :class:`~dfm.config.SamplerConfig`)
        and the bounds of this server; a ValueError names the field and what to change."""
        if r.class_label is not None and not 0 <= r.class_label < max(self.num_classes, 1):
            raise ValueError(f"class: this model has classes 0..{self.num_classes - 1}")
        if r.seeds is not None and (not r.seeds or any(not 0 <= s < 2**31 for s in r.seeds)):
            raise ValueError("seeds: give integers between 0 and 2^31 - 1, or leave empty for random ones")
        settings = self.generator.settings(steps=r.steps, thresholds=r.thresholds, guidance=r.guidance,
                                           solver=r.solver)  # fmt: skip
        if max(settings.steps) > MAX_STEPS:
            raise ValueError(
                f"steps: at most {MAX_STEPS} per stage on this server, e.g. {list(self.cfg.sampler.steps)}"
            )
        return settings

    def run(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        """Generate one job in a worker thread, sending its events to the page."""
        r, settings = job.request, job.settings
        send = lambda kind, data: loop.call_soon_threadsafe(job.events.put_nowait, (kind, data))  # noqa: E731
        seeds = r.seeds or [random.randrange(2**31) for _ in range(r.num_images)]
        labels = self.generator.labels(seeds, None if r.class_label is None else [r.class_label])
        total = self.generator.network_evaluations(settings)
        nrow = min(len(seeds), 4)
        tic = time.perf_counter()
        self.watched.job, self.watched.calls = job, 0
        self.watched.on_call = lambda n: send("progress", {"call": n, "total": total}) if n % 2 == 0 else None

        def stage_done(stage: int, preview: torch.Tensor) -> None:
            send("stage", {"stage": stage, "seconds": round(time.perf_counter() - tic, 3),
                           "image": _png(_enlarge(preview, self.shape[-2:]), nrow)})  # fmt: skip

        try:
            out = self.generator.generate(seeds, labels, settings, batch_size=MAX_IMAGES, callback=stage_done)
            final = self.generator.crop(out.images)  # videos: clips, shown as animated GIFs
            send("done", {"seconds": round(time.perf_counter() - tic, 3), "seeds": seeds, "image": _png(final, nrow),
                          "width": int(final.shape[-1]), "height": int(final.shape[-2])})  # fmt: skip
        except Cancelled:
            send("cancelled", {})
        except Exception as err:  # noqa: BLE001 - the page gets a message, the server keeps serving
            send("error", {"message": f"{type(err).__name__}: {err}"})
        finally:
            self.watched.job, self.watched.on_call = None, None


def _enlarge(x: torch.Tensor, size) -> torch.Tensor:
    """A stage's preview at the image size (clips frame by frame), so that every picture shows at one scale."""
    if x.dim() == 5:
        return torch.stack([upsample_to(x[:, :, f], size) for f in range(x.shape[2])], dim=2)
    return upsample_to(x, size)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server to this machine (127.0.0.1, ::1 or localhost)."""
    return host.strip("[]").lower() in LOOPBACK


def _split_address(netloc: str) -> tuple[str, int] | None:
    """``"name:port"`` or ``"[v6]:port"`` (a Host header, an Origin without its scheme) as (name, port); None if
    malformed. A missing port is HTTP's 80."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        end = netloc.find("]")
        name, rest = (netloc[1:end], netloc[end + 1 :]) if end > 0 else ("", "")
    else:
        name, colon, port = netloc.partition(":")
        rest = colon + port
    if not name or (rest and not (rest[:1] == ":" and rest[1:].isdigit() and len(rest) <= 6)):
        return None
    return name, int(rest[1:]) if rest else 80


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class _Guard:
    """Pure ASGI middleware in front of every request, in this order: the ``Host`` header and the ``Origin`` header
    (when sent) must name this server (403); the token, when the server has one (403); a POST must be
    ``application/json`` (415); a body may be at most :data:`MAX_BODY` bytes, counted as it is read (413, answered
    as soon as the limit is passed, the rest never read). Refusals are JSON ``{"error": ...}`` naming the header."""

    def __init__(self, app, *, host: str, port: int, token: str | None) -> None:
        self.app, self.port, self.token = app, port, token
        bound = host.strip("[]").lower()
        names = {bound}
        if is_loopback(bound) or bound in WILDCARD:
            names |= LOOPBACK
        if bound in WILDCARD:  # every address of the machine: its names, and any IP literal (not a DNS name)
            names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        self.names, self.any_ip = frozenset(names - WILDCARD), bound in WILDCARD
        self.cookie = f"dfm_serve_token_{port}"  # cookies are shared between the ports of a host

    def ours(self, netloc: str) -> bool:
        """Whether ``netloc`` is this server's address: a name it answers to and its port. A DNS name other than
        these could point anywhere (DNS rebinding); an IP literal cannot, so a wildcard bind accepts every one."""
        address = _split_address(netloc)
        if address is None or address[1] != self.port:
            return False
        return address[0] in self.names or (self.any_ip and _is_ip(address[0]))

    def token_given(self, scope, headers: dict[str, str]) -> tuple[bool, bool]:
        """(whether the request carries the right token, whether it came in the URL's query)."""
        want = self.token.encode()
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [])
        cookies = http.cookies.SimpleCookie()
        with contextlib.suppress(http.cookies.CookieError):
            cookies.load(headers.get("cookie", ""))
        given = [headers.get(TOKEN_HEADER, ""), cookies[self.cookie].value if self.cookie in cookies else ""]
        same = lambda t: bool(t) and secrets.compare_digest(t.encode("utf-8", "replace"), want)  # noqa: E731
        in_query = any(same(t) for t in query)
        return in_query or any(same(t) for t in given), in_query

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host, origin = headers.get("host"), headers.get("origin")
        if host is None or not self.ours(host):
            return await _refuse(send, 403, f"Host header {host!r} is not this server's address: open the URL "
                                 "that dfm serve printed")  # fmt: skip
        if origin is not None and not (origin.lower().startswith("http://") and self.ours(origin[7:])):
            return await _refuse(send, 403, f"Origin header {origin!r}: requests from other web pages are refused")
        if self.token is not None:
            ok, in_query = self.token_given(scope, headers)
            if not ok:
                return await _refuse(send, 403, "this server needs its token: open the URL with ?token=... that "
                                     f"dfm serve printed (scripts: the {TOKEN_HEADER} header)")  # fmt: skip
            if in_query and scope["method"] == "GET" and scope["path"] == "/":  # the printed URL: keep it as a cookie
                cookie = f"{self.cookie}={self.token}; Path=/; HttpOnly; SameSite=Strict"
                return await _reply(send, 303, b"", [(b"location", b"/"), (b"set-cookie", cookie.encode())])
        if scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return await _refuse(send, 415, f"Content-Type {kind or 'missing'}: send application/json")
        if "content-length" not in headers and "transfer-encoding" not in headers:
            return await self.app(scope, receive, send)  # no body (the event streams: receive stays theirs)
        size = headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
            return await _refuse(send, 413, f"request too large (at most {MAX_BODY} bytes)", close=True)
        chunks, read = [], 0
        while True:  # read the body here, counting: a chunked one has no length to check beforehand
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            read += len(message.get("body", b""))
            if read > MAX_BODY:
                return await _refuse(send, 413, f"request too large (at most {MAX_BODY} bytes)", close=True)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)

        async def replay():  # the body once, then the connection's own messages (its disconnect)
            nonlocal body
            if body is None:
                return await receive()
            message, body = {"type": "http.request", "body": body, "more_body": False}, None
            return message

        return await self.app(scope, replay, send)


async def _reply(send, status: int, body: bytes, headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode()), *(headers or [])]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


async def _refuse(send, status: int, message: str, close: bool = False) -> None:
    headers = [(b"content-type", b"application/json")] + ([(b"connection", b"close")] if close else [])
    await _reply(send, status, json.dumps({"error": message}).encode(), headers)


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _parse_json(raw: bytes) -> Any:
    """A request body as JSON, refused (ValueError) when not UTF-8 or JSON, or nested deeper than
    :data:`MAX_DEPTH` (checked before parsing, so that no parser recursion is ever asked for)."""
    text = raw.decode("utf-8")
    depth = 0
    for bracket in re.findall(r"[\[\]{}]", _STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        if depth > MAX_DEPTH:
            raise ValueError(f"the request is nested too deeply (at most {MAX_DEPTH} levels of [ and {{)")
    try:
        return json.loads(text)
    except RecursionError:  # not reached after the check above; kept so that no body can give a 500
        raise ValueError(f"the request is nested too deeply (at most {MAX_DEPTH} levels of [ and {{)") from None


def create_app(
    run: str | Path, device: str = "cpu", *, host: str = "127.0.0.1", port: int = 7860, token: str | None = None
) -> FastAPI:
    """The web app for the model of ``run`` (a run directory or a ``pretrained/`` directory), answering only as the
    server at ``host``:``port`` (the Host and Origin headers) and, with ``token``, only to requests that carry it."""
    server = Server(run, device)
    app = FastAPI(title="dfm serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(_Guard, host=host, port=port, token=token)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE

    @app.get("/api/info")
    async def info() -> dict:
        return server.info()

    @app.post("/api/generate")
    async def submit(request: Request) -> JSONResponse:
        try:
            body = _parse_json(await request.body())  # the guard has read it, at most MAX_BODY bytes
            r = GenerateRequest.model_validate(body)
            settings = server.check(r)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "request"
            return JSONResponse({"error": f"{where}: {first.get('msg')}"}, status_code=422)
        except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            return JSONResponse({"error": str(err) if str(err) else "the request is not valid JSON"}, status_code=422)
        if server.waiting >= MAX_QUEUE:
            return JSONResponse({"error": "too many jobs waiting: try again in a moment"}, status_code=429)
        job = Job(uuid.uuid4().hex, r, settings)
        server.jobs[job.id] = job
        server.waiting += 1
        loop = asyncio.get_running_loop()
        job.timers.append(loop.call_later(server.open_timeout, server.expire, job))

        async def work() -> None:
            try:
                async with server.lock:  # one job at a time
                    server.waiting -= 1
                    if job.cancel.is_set():
                        job.events.put_nowait(("cancelled", {}))
                        return
                    await asyncio.to_thread(server.run, job, loop)
            finally:
                if job.id in server.jobs:  # its events wait for the page a while, then go with their images
                    job.timers.append(loop.call_later(server.keep_finished, server.drop, job))

        task = asyncio.create_task(work())
        server.tasks.add(task)
        task.add_done_callback(server.tasks.discard)
        return JSONResponse({"job": job.id})

    @app.post("/api/jobs/{job_id}/cancel")
    async def cancel(job_id: str) -> dict:
        job = server.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, "no such job")
        job.cancel.set()
        return {"cancelled": job_id}

    @app.get("/api/jobs/{job_id}/events")
    async def events(job_id: str, request: Request) -> StreamingResponse:
        job = server.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, "no such job")
        if job.attached:
            return JSONResponse({"error": "this job's events are already being read"}, status_code=409)
        job.attached = True

        async def stream():
            # The job lives as long as this stream: however it ends (the last event sent, the page closed or
            # reloaded, the connection lost), the job is cancelled if still running and dropped with its images.
            job.streamed = True
            try:
                while True:
                    try:
                        kind, data = await asyncio.wait_for(job.events.get(), POLL)
                    except asyncio.TimeoutError:  # nothing to send: is the page still there?
                        if await request.is_disconnected():
                            return
                        continue
                    yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
                    if kind in ("done", "error", "cancelled"):
                        return
            finally:
                server.drop(job)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


@contextlib.contextmanager
def running_server(run: str | Path, threads: int | None = None, timeout: float = 120.0) -> Iterator[str]:
    """``dfm serve RUN`` in a child process on a free local port, for scripts and tests; yields its URL once it
    answers, and stops it afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.Popen([sys.executable, "-m", "dfm", "serve", str(run), "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/info", timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"dfm serve {run} did not start:\n{proc.communicate()[0]}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def serve(
    run: str | Path, host: str = "127.0.0.1", port: int = 7860, device: str = "cpu", allow_remote: bool = False
) -> None:
    """Serve the page of ``run`` at ``host``:``port`` until Ctrl+C. Beyond the loopback (``host`` other than
    127.0.0.1, ::1, localhost) only with ``allow_remote``, and then with a token, printed in the URL."""
    token = None
    if not is_loopback(host):
        if not allow_remote:
            raise ValueError(f"--host {host} would open the page to other machines: bind 127.0.0.1 (the default), "
                             "or add --allow-remote (every request then needs the token that is printed)")  # fmt: skip
        token = secrets.token_urlsafe(24)
    import uvicorn  # the server itself; the app above is importable without running it

    app = create_app(run, device, host=host, port=port, token=token)
    name = f"[{host.strip('[]')}]" if ":" in host else host
    names = [socket.gethostname(), "127.0.0.1"] if host.strip("[]") in WILDCARD else [name]
    urls = "  ".join(f"http://{n}:{port}/" + (f"?token={token}" if token else "") for n in names)
    print(f"dfm serve: {urls}  (model {run}; Ctrl+C stops)", flush=True)
    uvicorn.run(app, host=host.strip("[]"), port=port, log_level="warning")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dfm serve</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5em; max-width: 60em; }
 fieldset { display: flex; flex-wrap: wrap; gap: 0.8em 1.5em; border: 1px solid #ccc; }
 label { display: flex; flex-direction: column; font-size: 0.9em; }
 input, select { width: 9em; }
 #error { color: #b00020; min-height: 1.2em; }
 #stages { display: flex; gap: 1.5em; flex-wrap: wrap; margin-top: 1em; }
 figure { margin: 0; } img { image-rendering: pixelated; width: 16em; border: 1px solid #ddd; }
 #final:not([src]) { display: none; }
 #timeline { font-family: monospace; }
</style></head><body>
<h1>dfm serve</h1>
<p id="about"></p>
<fieldset>
 <label>class <select id="class_label"><option value="">by seed</option></select></label>
 <label>seeds (e.g. 0-3, empty = random) <input id="seeds" value=""></label>
 <label>images (when no seeds) <input id="num_images" type="number" value="4" min="1"></label>
 <label>guidance (one, or one per stage) <input id="guidance" value="1.0"></label>
 <label>steps per stage <input id="steps"></label>
 <label>thresholds <input id="thresholds"></label>
 <label>solver <select id="solver"></select></label>
</fieldset>
<p><button id="generate">Generate</button> <button id="cancel" disabled>Cancel</button></p>
<div id="error" role="alert"></div>
<div id="timeline"></div>
<div id="stages"></div>
<h2>Result</h2>
<figure><img id="final" alt="final images"><figcaption id="final_caption"></figcaption></figure>
<script>
const $ = (id) => document.getElementById(id);
const MAX_SEED = 2147483647;  // 2^31 - 1, as on the server
let info = null, job = null, source = null;
// The fields as the server checks them, so that a typo is a message here rather than other settings.
function entries(text, what) {  // "1, 2,3" -> ["1", "2", "3"]; null when empty; an empty entry is refused
  text = text.trim(); if (!text) return null;
  const out = text.split(",").map((p) => p.trim());
  if (out.includes("")) throw new Error(`${what}: an empty entry between commas in "${text}"; write e.g. 1,2,3`);
  return out;
}
function decimals(text, what) {
  const out = entries(text, what);
  return out && out.map((p) => {
    if (!/^[+-]?(\\d+\\.?\\d*|\\.\\d+)([eE][+-]?\\d+)?$/.test(p)) throw new Error(`${what}: "${p}" is not a number`);
    return Number(p); });
}
function integers(text, what) {
  const out = entries(text, what);
  return out && out.map((p) => {
    if (!/^\\d+$/.test(p)) throw new Error(`${what}: "${p}" is not a whole number`);
    return Number(p); });
}
function parseSeeds(text, limit) {  // "0-3, 7" -> [0, 1, 2, 3, 7]; null (random seeds) when empty
  const seed = (s, part) => {
    if (!/^\\d+$/.test(s) || Number(s) > MAX_SEED)
      throw new Error(`seeds: "${part}" is neither an integer from 0 to ${MAX_SEED} (2^31 - 1) nor a range like 0-3`);
    return Number(s); };
  const parts = entries(text, "seeds"), out = [];
  if (parts === null) return null;
  for (const part of parts) {
    const range = part.match(/^([^-]*)-([^-]*)$/), ends = range ? [range[1].trim(), range[2].trim()] : [part, part];
    const [a, b] = ends.map((s) => seed(s, part)), count = out.length + b - a + 1;
    if (b < a) throw new Error(`seeds: the range ${part} goes down; write the smaller seed first`);
    if (count > limit)  // counted before a range is expanded
      throw new Error(`seeds: at most ${limit} images at once on this server (these are ${count} or more)`);
    for (let i = a; i <= b; i++) out.push(i);
  }
  return out;
}
async function load() {
  const res = await fetch("/api/info"), reply = await res.json();
  if (!res.ok) { $("error").textContent = reply.error || res.statusText; return; }
  info = reply;
  $("about").textContent = `${info.method}, ${info.stages} stage(s); up to ${info.limits.images} images` +
    (info.previews_exact ? "" : "; stage previews are approximate (autoencoder not scale-equivariant)");
  info.classes.forEach((name, i) => $("class_label").add(new Option(`${i}: ${name}`, i)));
  info.solvers.forEach((s) => $("solver").add(new Option(s, s, s === info.solver, s === info.solver)));
  $("steps").value = info.steps.join(","); $("thresholds").value = info.thresholds.join(",");
  $("guidance").value = info.guidance.join(",");
}
function finish() { $("generate").disabled = false; $("cancel").disabled = true; if (source) source.close(); }
$("generate").onclick = async () => {
  $("error").textContent = ""; $("stages").innerHTML = ""; $("final").removeAttribute("src");
  $("final_caption").textContent = ""; $("timeline").textContent = "";
  let body;
  try {
    if (!info) throw new Error("the page could not read the model's settings from the server: reload it");
    const images = $("num_images").value.trim(), limit = info.limits.images;
    if (!/^\\d+$/.test(images) || +images < 1 || +images > limit)
      throw new Error(`images: a whole number from 1 to ${limit}`);
    body = { num_images: +images, solver: $("solver").value,
      guidance: decimals($("guidance").value, "guidance"), steps: integers($("steps").value, "steps"),
      thresholds: decimals($("thresholds").value, "thresholds"), seeds: parseSeeds($("seeds").value, limit),
      class_label: $("class_label").value === "" ? null : +$("class_label").value };
  } catch (e) { $("error").textContent = e.message; return; }
  const started = performance.now();
  let res, reply;
  try {
    res = await fetch("/api/generate", { method: "POST", headers: { "Content-Type": "application/json" },
                                         body: JSON.stringify(body) });
    reply = await res.json();
  } catch (e) { $("error").textContent = `the server did not answer: ${e.message}`; return; }
  if (!res.ok) { $("error").textContent = reply.error || reply.detail || res.statusText; return; }
  job = reply.job; $("generate").disabled = true; $("cancel").disabled = false;
  $("final_caption").textContent = "generating: each stage's preview appears above as soon as it is ready";
  source = new EventSource(`/api/jobs/${job}/events`);  // closing it (or the page) cancels the job on the server
  source.addEventListener("progress", (e) => { const d = JSON.parse(e.data);
    $("timeline").textContent = `network evaluations ${d.call} / ${d.total}`; });
  source.addEventListener("stage", (e) => { const d = JSON.parse(e.data);
    const fig = document.createElement("figure"); const img = new Image(); img.src = d.image;
    img.className = "preview"; img.dataset.stage = d.stage; img.dataset.at = performance.now() - started;
    fig.append(img, Object.assign(document.createElement("figcaption"),
      { textContent: `stage ${d.stage + 1} preview after ${d.seconds.toFixed(2)} s` }));
    $("stages").append(fig);
    $("final").src = d.image; $("final").dataset.final = "0";  // the latest preview stands in for the result
    $("final_caption").textContent = `stage ${d.stage + 1} preview; the next stage is being generated`; });
  source.addEventListener("done", (e) => { const d = JSON.parse(e.data); $("final").src = d.image;
    $("final").dataset.at = performance.now() - started; $("final").dataset.final = "1";
    $("final_caption").textContent = `${d.seeds.length} image(s) of ${d.width}x${d.height}, seeds ${d.seeds.join(", ")},
 ${d.seconds.toFixed(2)} s`; finish(); });
  source.addEventListener("error", (e) => {  // the job's error, or the stream lost
    const message = e.data ? JSON.parse(e.data).message : "the connection to the server was lost";
    $("error").textContent = message; $("final_caption").textContent = `stopped: ${message}`; finish(); });
  source.addEventListener("cancelled", () => { $("error").textContent = "cancelled";
    $("final_caption").textContent = $("final").hasAttribute("src")
      ? "cancelled: the picture is the last stage preview, not the final images" : "cancelled"; finish(); });
};
$("cancel").onclick = () => {
  if (!job) return;
  $("final_caption").textContent = "cancelling";
  fetch(`/api/jobs/${job}/cancel`, { method: "POST", headers: { "Content-Type": "application/json" } });
};
load();
</script></body></html>
"""
