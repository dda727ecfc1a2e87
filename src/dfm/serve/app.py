"""``dfm serve``: try a trained model in the browser, watching it generate coarse to fine.

FastAPI + uvicorn with server-sent events (a small, well-kept ASGI stack; the page needs one stream of events per
job, which SSE gives without a websocket protocol on either side). The page sends the settings, then receives one
event per stage as soon as that stage reaches its threshold (the stage's preview), progress events, and the final
images, one tile per image. With a DFM model the page can also stop every image at a stage's preview and finish
only the ones clicked (``/api/refine``, from the stopped samplings the server keeps a while), and vary the detail
of an image (``/api/vary``: its coarse level kept, new finer levels).

Safety (the checks in front of every request are :mod:`dfm.serve.guard`'s). It binds 127.0.0.1 unless told
otherwise; another address (``--host 0.0.0.0``) needs ``--allow-remote``, and
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
import io
import json
import os
import random
import secrets
import socket
import subprocess
import sys
import threading
import time
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
from dfm.sampling import SamplingState
from dfm.serve.guard import WILDCARD, Guard, is_loopback, parse_json
from dfm.visual import image_grid, upsample_to

PAGE = Path(__file__).with_name("page.html")
MAX_IMAGES = 16
MAX_STEPS = 200
MAX_QUEUE = 4
OPEN_TIMEOUT = 30.0  # seconds a job waits for its page to open its event stream before it is cancelled
KEEP_FINISHED = 30.0  # seconds a finished job (and its images) waits for its events to be read
POLL = 0.5  # seconds between checks that a page reading a job's events is still there
STOPPED_FOR = 600.0  # seconds the stopped samplings of a job are kept for /api/refine
KEEP_STOPPED = 8  # jobs whose stopped samplings are kept at most


class SamplerFields(BaseModel):
    """The sampler settings a page may change (None: the run's own); anything else is refused with a 422."""

    model_config = {"extra": "forbid"}

    guidance: list[float] | None = Field(None, min_length=1, max_length=8)
    steps: list[int] | None = Field(None, min_length=1, max_length=8)
    thresholds: list[float] | None = Field(None, max_length=7)
    solver: str | None = None
    shift: float | None = None  #: sampler.shift (SD3's time shift; 1 = none)
    shift_from: int | None = None  #: sampler.shift_from (the first stage shifted; -1 = the finest only)


class GenerateRequest(SamplerFields):
    """``/api/generate``: images for seeds (or random ones); with ``until_stage`` stopped at that stage's preview."""

    class_label: int | None = Field(None, ge=0, le=100_000)
    seeds: list[int] | None = Field(None, max_length=MAX_IMAGES)
    num_images: int = Field(4, ge=1, le=MAX_IMAGES)
    until_stage: int | None = Field(None, ge=1, le=8)  #: stop there (1 = the coarsest stage), to finish some later


class RefineRequest(BaseModel):
    """``/api/refine``: finish the chosen seeds of a job that stopped at a stage (with its settings)."""

    model_config = {"extra": "forbid"}

    job: str = Field(min_length=1, max_length=64)
    seeds: list[int] = Field(min_length=1, max_length=MAX_IMAGES)


class VaryRequest(SamplerFields):
    """``/api/vary``: variations of the image of ``seed`` that keep its coarse level(s) and draw new detail."""

    seed: int = Field(ge=0, lt=2**31)
    class_label: int | None = Field(None, ge=0, le=100_000)
    num_images: int = Field(4, ge=1, le=MAX_IMAGES)
    keep: int = Field(1, ge=1, le=7)


class Cancelled(Exception):
    """Raised inside the sampler when the page cancels its job."""


@dataclass
class Stopped:
    """The samplings of a job stopped with ``until_stage``, kept for ``/api/refine`` until ``expires``."""

    state: SamplingState
    seeds: list[int]
    labels: list[int] | None
    settings: SamplerConfig
    expires: float


@dataclass
class Job:
    id: str
    request: GenerateRequest | RefineRequest | VaryRequest
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
        self.stopped: dict[str, Stopped] = {}  #: the stopped samplings of recent jobs, for /api/refine
        self.decomposed = True
        try:  # what only a DFM model can do: stop at a stage, vary the detail
            self.generator.check_stage(0, "")
        except ValueError:
            self.decomposed = False

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
                "thresholds": list(sampler.thresholds), "thresholds_apply": self.generator.sampler.uses_thresholds,
                "guidance": list(sampler.guidance), "solver": sampler.solver,
                "shift": sampler.shift, "shift_from": sampler.shift_from, "solvers": list(SOLVERS),
                "classes": self.class_names,
                "limits": {"images": MAX_IMAGES, "steps": MAX_STEPS, "queue": MAX_QUEUE},
                "video": len(self.shape) == 4, "previews_exact": self.generator.previews_exact,
                "decomposed": self.decomposed}  # fmt: skip

    def check(self, r: GenerateRequest | RefineRequest | VaryRequest) -> SamplerConfig:
        """The request's sampler settings (checked where every front end's are, :class:`~dfm.config.SamplerConfig`)
        and the bounds of this server; a ValueError names the field and what to change."""
        if isinstance(r, RefineRequest):
            stopped = self.stopped.get(r.job)
            if stopped is None or stopped.expires < time.monotonic():
                raise ValueError("job: no stopped samplings of that job here (they are kept for "
                                 f"{STOPPED_FOR / 60:.0f} minutes): generate again with a stop stage")  # fmt: skip
            unknown = sorted(set(r.seeds) - set(stopped.seeds))
            if unknown:
                raise ValueError(f"seeds: {unknown[:4]} were not in that job (it stopped {len(stopped.seeds)})")
            return stopped.settings
        if r.class_label is not None and not 0 <= r.class_label < max(self.num_classes, 1):
            raise ValueError(f"class: this model has classes 0..{self.num_classes - 1}")
        seeds = getattr(r, "seeds", None)
        if seeds is not None and (not seeds or any(not 0 <= s < 2**31 for s in seeds)):
            raise ValueError("seeds: give integers between 0 and 2^31 - 1, or leave empty for random ones")
        settings = self.generator.settings(steps=r.steps, thresholds=r.thresholds, guidance=r.guidance,
                                           solver=r.solver, shift=r.shift, shift_from=r.shift_from)  # fmt: skip
        if max(settings.steps) > MAX_STEPS:
            raise ValueError(
                f"steps: at most {MAX_STEPS} per stage on this server, e.g. {list(self.cfg.sampler.steps)}"
            )
        if isinstance(r, VaryRequest):
            self.generator.check_keep(r.keep)
        elif r.until_stage is not None:
            self.generator.check_stage(r.until_stage - 1, "until_stage: stop after stage")
        return settings

    def run(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        """Generate one job in a worker thread, sending its events to the page."""
        r, settings, gen = job.request, job.settings, self.generator
        send = lambda kind, data: loop.call_soon_threadsafe(job.events.put_nowait, (kind, data))  # noqa: E731
        total = self._calls(r, settings)
        tic = time.perf_counter()
        self.watched.job, self.watched.calls = job, 0
        self.watched.on_call = lambda n: send("progress", {"call": n, "total": total}) if n % 2 == 0 else None
        nrow = 4

        def stage_done(stage: int, preview: torch.Tensor) -> None:
            send("stage", {"stage": stage, "seconds": round(time.perf_counter() - tic, 3),
                           "image": _png(_enlarge(preview, self.shape[-2:]), nrow)})  # fmt: skip

        try:
            stop = None
            if isinstance(r, RefineRequest):
                stopped = self.stopped[r.job]
                rows = [stopped.seeds.index(s) for s in r.seeds]
                seeds, labels = list(r.seeds), None if stopped.labels is None else [stopped.labels[i] for i in rows]
                out = gen.refine(stopped.state.select(rows), labels, settings, batch_size=MAX_IMAGES,
                                 callback=stage_done)  # fmt: skip
            elif isinstance(r, VaryRequest):
                seeds = [random.randrange(2**31) for _ in range(r.num_images)]
                label = None if self.num_classes == 0 else (r.class_label if r.class_label is not None
                                                            else r.seed % self.num_classes)  # fmt: skip
                labels = None if label is None else [label] * len(seeds)
                out = gen.vary(r.seed, seeds, label, settings, keep=r.keep, batch_size=MAX_IMAGES,
                               callback=stage_done)  # fmt: skip
            else:
                seeds = r.seeds or [random.randrange(2**31) for _ in range(r.num_images)]
                labels = gen.labels(seeds, None if r.class_label is None else [r.class_label])
                stop = None if r.until_stage is None else r.until_stage - 1
                out = gen.generate(seeds, labels, settings, batch_size=MAX_IMAGES, callback=stage_done,
                                   until_stage=stop)  # fmt: skip
            if stop is not None:
                self._keep_stopped(job.id, Stopped(out.state, seeds, labels, settings, time.monotonic() + STOPPED_FOR))
                final = _enlarge(out.images, self.shape[-2:])
            else:
                final = gen.crop(out.images)  # videos: clips, shown as animated GIFs
            send("done", {"seconds": round(time.perf_counter() - tic, 3), "seeds": seeds, "labels": labels,
                          "image": _png(final, nrow), "tiles": [_png(x[None], 1) for x in final],
                          "width": int(final.shape[-1]), "height": int(final.shape[-2]),
                          "stopped": None if stop is None else stop + 1, "job": job.id})  # fmt: skip
        except Cancelled:
            send("cancelled", {})
        except Exception as err:  # noqa: BLE001 - the page gets a message, the server keeps serving
            send("error", {"message": f"{type(err).__name__}: {err}"})
        finally:
            self.watched.job, self.watched.on_call = None, None

    def _calls(self, r: GenerateRequest | RefineRequest | VaryRequest, settings: SamplerConfig) -> int:
        """The network evaluations of one image of the job: its stages only when it stops or resumes, and for
        variations, the image varied first."""
        stages = len(settings.steps)

        def calls(lo: int, hi: int) -> int:  # stages lo..hi-1; a Heun step ending on the data (t = 1) is an Euler one
            n = sum(settings.steps[lo:hi])
            return 2 * n - (hi == stages) if settings.solver == "heun" else n

        if isinstance(r, RefineRequest):
            return calls(self.stopped[r.job].state.stage + 1, stages)
        if isinstance(r, VaryRequest):
            return calls(0, stages) + calls(r.keep, stages)
        return calls(0, stages if r.until_stage is None else r.until_stage)

    def _keep_stopped(self, job_id: str, stopped: Stopped) -> None:
        """Keep the stopped samplings of a job for a while; the oldest go when too many are kept."""
        now = time.monotonic()
        for key in [k for k, v in self.stopped.items() if v.expires < now]:
            del self.stopped[key]
        while len(self.stopped) >= KEEP_STOPPED:
            del self.stopped[next(iter(self.stopped))]
        self.stopped[job_id] = stopped


def _enlarge(x: torch.Tensor, size) -> torch.Tensor:
    """A stage's preview at the image size (clips frame by frame), so that every picture shows at one scale."""
    if x.dim() == 5:
        return torch.stack([upsample_to(x[:, :, f], size) for f in range(x.shape[2])], dim=2)
    return upsample_to(x, size)


def create_app(
    run: str | Path, device: str = "cpu", *, host: str = "127.0.0.1", port: int = 7860, token: str | None = None
) -> FastAPI:
    """The web app for the model of ``run`` (a run directory or a ``pretrained/`` directory), answering only as the
    server at ``host``:``port`` (the Host and Origin headers) and, with ``token``, only to requests that carry it."""
    server = Server(run, device)
    app = FastAPI(title="dfm serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(Guard, host=host, port=port, token=token)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE.read_text()

    @app.get("/api/info")
    async def info() -> dict:
        return server.info()

    async def submit(request: Request, kind: type[BaseModel]) -> JSONResponse:
        try:
            body = parse_json(await request.body())  # the guard has read it, at most MAX_BODY bytes
            r = kind.model_validate(body)
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

    @app.post("/api/generate")
    async def generate(request: Request) -> JSONResponse:
        return await submit(request, GenerateRequest)

    @app.post("/api/refine")
    async def refine(request: Request) -> JSONResponse:
        return await submit(request, RefineRequest)

    @app.post("/api/vary")
    async def vary(request: Request) -> JSONResponse:
        return await submit(request, VaryRequest)

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
