"""``dfm serve``: try a trained model in the browser, watching it generate coarse to fine.

FastAPI + uvicorn with server-sent events (a small, well-kept ASGI stack; the page needs one stream of events per
job, which SSE gives without a websocket protocol on either side). The page sends the settings, then receives one
event per stage as soon as that stage reaches its threshold (the stage's preview), progress events, and the final
images. Safety: it binds 127.0.0.1 unless told otherwise; every field is validated with bounds and a bad value gets
a 4xx with a message the page shows; the client never names a file; one job runs at a time, a few wait, more are
refused (429); the model is loaded once and only read.

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
from dfm.visual import image_grid, upsample_to

MAX_IMAGES = 16
MAX_STEPS = 200
MAX_QUEUE = 4
MAX_BODY = 16_384  # bytes of a request body


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
        self.jobs: dict[str, Job] = {}
        self.waiting = 0
        self.lock = asyncio.Lock()

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


def create_app(run: str | Path, device: str = "cpu") -> FastAPI:
    """The web app for the model of ``run`` (a run directory or a ``pretrained/`` directory)."""
    server = Server(run, device)
    app = FastAPI(title="dfm serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
            return JSONResponse({"error": f"request too large (at most {MAX_BODY} bytes)"}, status_code=413)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE

    @app.get("/api/info")
    async def info() -> dict:
        return server.info()

    @app.post("/api/generate")
    async def submit(request: Request) -> JSONResponse:
        try:
            body = await request.json()
            r = GenerateRequest.model_validate(body)
            settings = server.check(r)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "request"
            return JSONResponse({"error": f"{where}: {first.get('msg')}"}, status_code=422)
        except (ValueError, UnicodeDecodeError) as err:
            return JSONResponse({"error": str(err) if str(err) else "the request is not valid JSON"}, status_code=422)
        if server.waiting >= MAX_QUEUE:
            return JSONResponse({"error": "too many jobs waiting: try again in a moment"}, status_code=429)
        job = Job(uuid.uuid4().hex, r, settings)
        server.jobs[job.id] = job
        server.waiting += 1
        loop = asyncio.get_running_loop()

        async def work() -> None:
            async with server.lock:  # one job at a time
                server.waiting -= 1
                if job.cancel.is_set():
                    job.events.put_nowait(("cancelled", {}))
                    return
                await asyncio.to_thread(server.run, job, loop)

        asyncio.create_task(work())
        return JSONResponse({"job": job.id})

    @app.post("/api/jobs/{job_id}/cancel")
    async def cancel(job_id: str) -> dict:
        job = server.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, "no such job")
        job.cancel.set()
        return {"cancelled": job_id}

    @app.get("/api/jobs/{job_id}/events")
    async def events(job_id: str) -> StreamingResponse:
        job = server.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, "no such job")

        async def stream():
            while True:
                kind, data = await job.events.get()
                yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
                if kind in ("done", "error", "cancelled"):
                    server.jobs.pop(job_id, None)
                    return

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


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 7860, device: str = "cpu") -> None:
    import uvicorn  # the server itself; the app above is importable without running it

    app = create_app(run, device)
    print(f"dfm serve: http://{host}:{port}  (model {run}; Ctrl+C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


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
let info = null, job = null, source = null;
function numbers(text, parse) {
  text = text.trim(); if (!text) return null;
  const out = [];
  for (const part of text.split(",")) {
    const range = part.trim().match(/^(\\d+)-(\\d+)$/);
    if (range) { for (let i = +range[1]; i <= +range[2]; i++) out.push(i); }
    else out.push(parse(part.trim()));
  }
  return out;
}
async function load() {
  info = await (await fetch("/api/info")).json();
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
    body = { num_images: +$("num_images").value, solver: $("solver").value,
      guidance: numbers($("guidance").value, Number), steps: numbers($("steps").value, Number),
      thresholds: numbers($("thresholds").value, Number), seeds: numbers($("seeds").value, Number),
      class_label: $("class_label").value === "" ? null : +$("class_label").value };
    if (Object.values(body).some((v) => Array.isArray(v) && v.some(Number.isNaN)) || Number.isNaN(body.num_images))
      throw new Error("numbers only, e.g. 30,10");
  } catch (e) { $("error").textContent = e.message; return; }
  const started = performance.now();
  const res = await fetch("/api/generate", { method: "POST", headers: { "Content-Type": "application/json" },
                                             body: JSON.stringify(body) });
  const reply = await res.json();
  if (!res.ok) { $("error").textContent = reply.error || reply.detail || res.statusText; return; }
  job = reply.job; $("generate").disabled = true; $("cancel").disabled = false;
  $("final_caption").textContent = "generating: each stage's preview appears above as soon as it is ready";
  source = new EventSource(`/api/jobs/${job}/events`);
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
  source.addEventListener("error", (e) => { if (e.data) $("error").textContent = JSON.parse(e.data).message;
    finish(); });
  source.addEventListener("cancelled", () => { $("error").textContent = "cancelled"; finish(); });
};
$("cancel").onclick = () => { if (job) fetch(`/api/jobs/${job}/cancel`, { method: "POST" }); };
load();
</script></body></html>
"""
