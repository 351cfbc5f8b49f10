"""`pfx serve`: a local HTTP service that renders requests for installed concepts, micro-batching concurrent
requests with different concepts into one UNet batch (perfusion_hub.batch.render_batch).

    GET  /                          a small web page: prompt box, installed concepts with previews, results
    GET  /health                    status, base, queue, batches and images rendered so far, limits
    GET  /concepts                  installed concepts (name, version, superclass, trigger, preview URL, ...)
    GET  /concepts/{name}/preview   the concept's first preview image
    POST /render                    JSON (cli/render_spec.py fields, plus steps, guidance, "response": "png"|"json")
                                    -> one PNG with pfx's text chunks (count 1, the default), or JSON with every
                                    PNG in base64 and its parameters

One model worker (a thread that owns the pipeline) takes jobs from a queue. When a job arrives it waits up to
`window_s` for more (or until `max_batch` images are waiting), takes the waiting jobs with the same steps and
guidance, in arrival order, up to `max_batch` images, and renders them as one batch with per-image concept sets.
Everything a request can get wrong is checked before it is queued (fields, sizes, concepts installed and made for
this base) or, for what needs the loaded model (a concept set that cannot be composed, a --with word missing from
the prompt), by the worker for that job alone: a bad request gets a 4xx JSON {"error": "..."} and never fails the
other jobs of its batch, and a client that goes away only loses its own result (its job is dropped if it has not
started; otherwise its images are thrown away).

Neither click nor the registry is imported here: the concepts come from a ConceptSource (cli/cmd_serve.py's reads
the installed concepts of a pfx home; StaticSource serves Concept objects, for benchmarks and tests).
"""

import asyncio
import base64
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cli.render_spec import SpecError, parse_spec

STATIC = Path(__file__).resolve().parent / "static"
SERVE_FIELDS = frozenset({"prompt", "seed", "count", "concepts", "beta", "tau", "negative", "steps", "guidance",
                          "response"})


class ServeError(Exception):
    """A request the service refuses: HTTP status and a message for {"error": ...}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Limits:
    max_count: int = 8  # images per request
    max_steps: int = 150
    max_batch: int = 8  # images per UNet batch (x2 rows with guidance)
    window_s: float = 0.02  # how long a batch waits for more requests
    max_queue: int = 64  # images waiting; more: 503
    max_body: int = 64 * 1024  # bytes of a request body
    default_steps: int = 50
    default_guidance: float = 7.5


class ConceptSource(Protocol):
    """Where the service finds concepts. Methods are called from request threads (several at once)."""

    def names(self) -> set[str]: ...

    def listing(self) -> list[dict]: ...

    def resolve(self, names: list[str]) -> tuple[list, object]:
        """(Concept objects, their covariance) for these names; raises ServeError (404 not installed, 422 for
        another base)."""

    def preview(self, name: str) -> tuple[bytes, str] | None: ...


class StaticSource:
    """Concept objects held in memory (benchmarks, tests): no registry, no files."""

    def __init__(self, concepts: list, covariance, previews: dict[str, tuple[bytes, str]] | None = None):
        from perfusion_hub.concept import concept_bytes, load_concept

        # through the file format once: each gets the digest by which the worker sees it is loaded already
        self.concepts = {c.name: c if c.digest else load_concept(concept_bytes(c)) for c in concepts}
        self.covariance = covariance
        self.previews = dict(previews or {})

    def names(self) -> set[str]:
        return set(self.concepts)

    def listing(self) -> list[dict]:
        return [{"name": c.name, "version": c.metadata.get("version", ""), "superclass": c.superclass,
                 "trigger": c.trigger, "description": c.metadata.get("description", ""),
                 "preview": f"/concepts/{c.name}/preview" if c.name in self.previews else None}
                for c in self.concepts.values()]

    def resolve(self, names: list[str]) -> tuple[list, object]:
        missing = [n for n in names if n not in self.concepts]
        if missing:
            raise ServeError(404, f"not installed: {', '.join(missing)}")
        return [self.concepts[n] for n in names], self.covariance

    def preview(self, name: str):
        return self.previews.get(name)


@dataclass
class Job:
    request: object  # perfusion_hub.batch.RenderRequest
    steps: int
    guidance: float
    concepts: list
    covariance: object
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future | None = None  # made on the event loop by the handler
    submitted: float = field(default_factory=time.monotonic)
    started: float = 0.0
    batch_size: int = 0
    cancelled: bool = False

    @property
    def key(self) -> tuple:
        return (self.steps, self.guidance)

    @property
    def images(self) -> int:
        return self.request.count

    def _settle(self, fn, value) -> None:
        def settle():
            if not self.future.done():
                fn(value)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop is closed: the server is stopping
            pass

    def done(self, result) -> None:
        self._settle(self.future.set_result, result)

    def fail(self, error: Exception) -> None:
        self._settle(self.future.set_exception, error)


class BatchWorker:
    """The thread that owns the pipeline: micro-batches queued jobs and renders them."""

    def __init__(self, base, limits: Limits, *, log: Callable[[str], None] = lambda m: None):
        self.base = base
        self.limits = limits
        self.log = log
        self._pending: list[Job] = []
        self._cv = threading.Condition()
        self._stop = False
        self.stats = {"batches": 0, "images": 0, "requests": 0, "failed": 0, "dropped": 0, "last_batch": [],
                      "busy": False, "worker_alive": True}
        self._thread = threading.Thread(target=self._run, name="pfx-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    def queued(self) -> int:
        with self._cv:
            return sum(j.images for j in self._pending)

    def submit(self, job: Job) -> None:
        with self._cv:
            waiting = sum(j.images for j in self._pending)
            if waiting + job.images > self.limits.max_queue:
                raise ServeError(503, f"busy: {waiting} images are queued (at most {self.limits.max_queue}); "
                                      "try again shortly")
            self._pending.append(job)
            self._cv.notify_all()

    def _next_batch(self) -> list[Job] | None:
        lim = self.limits
        with self._cv:
            while not self._pending and not self._stop:
                self._cv.wait(0.5)
            if self._stop:
                return None
            first = self._pending[0]
            deadline = first.submitted + lim.window_s
            while True:
                alike = sum(j.images for j in self._pending if j.key == first.key and not j.cancelled)
                left = deadline - time.monotonic()
                if alike >= lim.max_batch or left <= 0 or self._stop:
                    break
                self._cv.wait(left)
            batch, total = [], 0
            for j in list(self._pending):
                if j.key != first.key:
                    continue
                if j.cancelled:
                    self._pending.remove(j)
                    self.stats["dropped"] += 1
                    continue
                if batch and total + j.images > lim.max_batch:
                    break
                batch.append(j)
                total += j.images
                self._pending.remove(j)
            return batch

    def _run(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                if batch:
                    self.stats["busy"] = True
                    try:
                        self._render(batch)
                    finally:
                        self.stats["busy"] = False
        finally:
            self.stats["worker_alive"] = False

    def _load(self, jobs: list[Job]) -> list[Job]:
        """Load each job's concepts (a job whose concepts cannot be loaded fails alone) and check it against
        them; the jobs that can be rendered. A job that wants another file of a concept than an earlier job of
        the batch (a new version installed meanwhile) waits for the next batch: one name, one file per batch."""
        from perfusion_hub.batch import check_request
        from perfusion_hub.errors import EngineError
        from perfusion_hub.loaders import loaded_concepts, unload_concepts
        from perfusion_hub.render import ensure_loaded

        ok, later, files = [], [], {}
        for j in jobs:
            if any(files.get(c.name, c.digest) != c.digest for c in j.concepts):
                later.append(j)
                continue
            try:
                try:
                    ensure_loaded(self.base, j.concepts, j.covariance)
                except EngineError:
                    # perhaps only with concepts loaded for earlier requests: unload those this batch does not use
                    need = {c.name for k in jobs for c in k.concepts}
                    idle = [n for n in loaded_concepts(self.base.pipe) if n not in need]
                    if not idle:
                        raise
                    unload_concepts(self.base.pipe, idle)
                    ensure_loaded(self.base, j.concepts, j.covariance)
                check_request(self.base, j.request)
                files.update({c.name: c.digest for c in j.concepts})
                ok.append(j)
            except (EngineError, KeyError, ValueError) as e:
                self.stats["failed"] += 1
                j.fail(ServeError(422, str(e).strip("'\"")))
        if later:
            with self._cv:
                self._pending[:0] = later
                self._cv.notify_all()
        return ok

    def _render(self, jobs: list[Job]) -> None:
        from perfusion_hub.batch import render_batch

        try:
            ok = self._load(jobs)
        except Exception as e:  # noqa: BLE001 - a bug must fail these jobs, not the worker
            self.log(f"error: loading concepts failed: {e!r}")
            for j in jobs:
                j.fail(ServeError(500, f"internal error while loading concepts: {e}"))
            return
        if not ok:
            return
        n = sum(j.images for j in ok)
        t0 = time.monotonic()
        for j in ok:
            j.started, j.batch_size = t0, n
        try:
            results = render_batch(self.base, [j.request for j in ok], steps=ok[0].steps, guidance=ok[0].guidance)
        except Exception as e:  # noqa: BLE001
            self.log(f"error: a batch of {n} images failed: {e!r}")
            self.stats["failed"] += len(ok)
            for j in ok:
                j.fail(ServeError(500, f"internal error while rendering: {e}"))
            return
        self.stats["batches"] += 1
        self.stats["images"] += n
        self.stats["requests"] += len(ok)
        self.stats["last_batch"] = [j.request.count for j in ok]
        self.log(f"batch: {len(ok)} requests, {n} images, {time.monotonic() - t0:.2f} s")
        for j, r in zip(ok, results):
            j.done(r)


def png_bytes(result) -> list[bytes]:
    """The PNGs of a RenderResult exactly as `pfx render` writes them (RenderResult.save, text chunks and all)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pfx-serve-") as d:
        return [p.read_bytes() for p in result.save(Path(d) / "render.png")]


class RenderService:
    """What the HTTP layer needs: the base, the concept source, the limits and the worker."""

    def __init__(self, base, source: ConceptSource, limits: Limits | None = None, *,
                 log: Callable[[str], None] = lambda m: None):
        self.base = base
        self.source = source
        self.limits = limits or Limits()
        self.worker = BatchWorker(base, self.limits, log=log)
        self.started = time.time()

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()

    def health(self) -> dict:
        w = self.worker
        lim = self.limits
        return {"status": "ok" if w.stats["worker_alive"] else "worker stopped", "base": self.base.name,
                "base_digest": self.base.digest, "device": str(self.base.device), "size": self.base.resolution,
                "queued_images": w.queued(), **{k: v for k, v in w.stats.items() if k != "worker_alive"},
                "uptime_s": round(time.time() - self.started, 1),
                "limits": {"max_count": lim.max_count, "max_steps": lim.max_steps, "max_batch": lim.max_batch,
                           "window_ms": round(lim.window_s * 1000, 1), "max_queue": lim.max_queue,
                           "default_steps": lim.default_steps, "default_guidance": lim.default_guidance}}

    def job_for(self, body: bytes, loop) -> tuple[Job, str, list[str]]:
        """Check a POST /render body and resolve its concepts: (job, response kind, notes). Raises ServeError."""
        from perfusion_hub.prompts import scan_prompt

        lim = self.limits
        if len(body) > lim.max_body:
            raise ServeError(413, f"the request body is {len(body)} bytes; at most {lim.max_body}")
        try:
            obj = json.loads(body or b"")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ServeError(400, f"malformed JSON: {getattr(e, 'msg', str(e))} (send a JSON object such as "
                                  '{"prompt": "a photo of cat-mittens", "seed": 1})') from None
        try:
            spec = parse_spec(obj, allowed=SERVE_FIELDS, max_count=lim.max_count, max_steps=lim.max_steps)
        except SpecError as e:
            raise ServeError(422, str(e)) from None
        response = obj.get("response") or ("png" if spec.count == 1 else "json")
        if response not in ("png", "json"):
            raise ServeError(422, '"response" must be "png" or "json"')
        if response == "png" and spec.count > 1:
            raise ServeError(422, 'a PNG response holds one image: ask for "response": "json" (or "count": 1)')
        installed = self.source.names()
        scan = scan_prompt(spec.prompt, installed | set(spec.with_names))
        names = list(dict.fromkeys(scan.names + spec.with_names))
        notes = [f"'{w}' is not an installed concept, so it stays plain text" for w in scan.unknown]
        concepts, cov = self.source.resolve(names) if names else ([], None)
        job = Job(spec.request(), spec.steps or lim.default_steps,
                  lim.default_guidance if spec.guidance is None else spec.guidance, concepts, cov, loop)
        return job, response, notes


def create_app(service: RenderService):
    """The FastAPI app over a RenderService (start the service's worker before serving). No `from __future__
    import annotations` in this module: FastAPI reads the endpoints' annotations (Request) at runtime."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="pfx serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ServeError)
    async def serve_error(_request, exc: ServeError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        text = f"no such page: {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse({"error": text}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc):
        return JSONResponse({"error": f"invalid request: {exc.errors()}"}, status_code=422)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse((STATIC / "serve.html").read_text(encoding="utf-8"))

    @app.get("/health")
    def health():
        return service.health()

    @app.get("/concepts")
    def concepts():
        return {"concepts": service.source.listing()}

    @app.get("/concepts/{name:path}/preview")
    def preview(name: str):
        found = service.source.preview(name)
        if found is None:
            raise ServeError(404, f"no preview for {name!r} (not installed, or published without previews)")
        data, media = found
        return Response(data, media_type=media, headers={"Cache-Control": "max-age=3600"})

    @app.post("/render")
    async def render(request: Request):
        loop = asyncio.get_running_loop()
        body = await request.body()
        job, response, notes = await run_in_threadpool(service.job_for, body, loop)
        job.future = loop.create_future()
        job.submitted = time.monotonic()
        service.worker.submit(job)
        while True:  # wait for the job; a client that goes away drops its job if it has not started
            done, _ = await asyncio.wait({job.future}, timeout=0.25)
            if done:
                break
            if await request.is_disconnected():
                job.cancelled = True
                job.future.cancel()
                return Response(status_code=499)
        result = job.future.result()
        pngs = await run_in_threadpool(png_bytes, result)
        timing = {"queue_s": round(job.started - job.submitted, 3), "batch_images": job.batch_size}
        if response == "png":
            return Response(pngs[0], media_type="image/png",
                            headers={"X-Pfx-Concepts": ",".join(result.concepts), "X-Pfx-Seed": str(result.params["seed"]),
                                     "X-Pfx-Batch-Images": str(job.batch_size)})
        return {"prompt": result.params["prompt"], "text": result.prompt, "concepts": result.concepts,
                "params": result.params, "notes": notes, **timing,
                "images": [{"index": i, "png_base64": base64.b64encode(p).decode("ascii")} for i, p in enumerate(pngs)]}

    return app


class RunningServer:
    """uvicorn serving an app on a background thread (tests, benchmarks); `url`, `stop()`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
