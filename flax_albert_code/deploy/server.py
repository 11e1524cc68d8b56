"""The HTTP JSON API over an export: FastAPI app, dynamic batching, limits, Prometheus metrics.

  app = create_app(load_export("exports/small"), Limits(max_wait_ms=10))
  uvicorn.run(app, host="127.0.0.1", port=8000)      # what `python -m flax_albert_code.serve` does

Routes: POST /v1/generate, /v1/embed, /v1/search; GET /healthz, /metrics (Prometheus text),
/openapi.json, /docs and / (the playground page, static/playground.html).

Dynamic batching: each request's texts are queued; one background task takes the first waiting
request, then whatever else arrives within `max_wait_ms` (or until the largest batch bucket is
full), merges requests with the same options into one call of the export (which pads them into
its compiled batch buckets) and runs it on one worker thread, so the event loop keeps accepting
requests while the model runs. Every limit is refused with a 4xx JSON error {"detail": "..."}:
body size (413), another content type (415), malformed JSON or non-UTF-8 bodies (400), unknown
fields, wrong types and values out of range (422), a full queue (429), a request that waits too
long (408).
"""
# No `from __future__ import annotations`: FastAPI reads the handlers' annotations, which name
# models built inside create_app.
import asyncio
import concurrent.futures
import dataclasses
import importlib.resources
import logging
import math
import re
import time
from typing import Any, Callable, Literal, Optional, Union

import numpy as np
import prometheus_client
import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclasses.dataclass
class Limits:
  max_body_bytes: int = 256 * 1024
  max_texts: int = 32              # descriptions (or texts, or queries) per request
  max_text_chars: int = 4000       # one description or query
  max_code_chars: int = 20000      # one code text to embed
  max_samples: int = 8
  max_top_k: int = 100
  request_timeout_s: float = 60.0
  max_queue_texts: int = 4096      # texts waiting for the model; more is refused with 429
  max_wait_ms: float = 10.0


class ApiError(Exception):
  def __init__(self, status: int, detail: str):
    super().__init__(detail)
    self.status, self.detail = status, detail


# ---------------------------------------------------------------------------------------------
# Dynamic batching.


@dataclasses.dataclass
class _Pending:
  key: tuple
  texts: list[str]
  future: asyncio.Future


class Batcher:
  """Merges concurrent requests with the same key into one `run(key, texts)` call.

  `run(key, texts) -> per-text results` runs on a single worker thread; a batch holds at most
  `max_texts` texts unless one request alone is larger.
  """

  def __init__(self, run: Callable[[tuple, list[str]], list[Any]], *, max_texts: int,
               max_wait_s: float, max_queue: int, observe: Callable[[str, int, int], None]):
    self.run, self.max_texts, self.max_wait_s = run, max_texts, max_wait_s
    self.max_queue, self.observe = max_queue, observe
    self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
    self.waiting = 0
    self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
    self.task: asyncio.Task | None = None

  def start(self) -> None:
    self.task = asyncio.get_running_loop().create_task(self._loop())

  async def stop(self) -> None:
    if self.task is not None:
      self.task.cancel()
      try:
        await self.task
      except asyncio.CancelledError:
        pass
    self.executor.shutdown(wait=False, cancel_futures=True)

  async def submit(self, key: tuple, texts: list[str]) -> list[Any]:
    if self.waiting + len(texts) > self.max_queue:
      raise ApiError(429, f"The server has {self.waiting} texts waiting for the model; "
                          "retry later.")
    fut = asyncio.get_running_loop().create_future()
    self.waiting += len(texts)
    await self.queue.put(_Pending(key, texts, fut))
    return await fut

  async def _collect(self) -> list[_Pending]:
    batch = [await self.queue.get()]
    n = len(batch[0].texts)
    deadline = time.monotonic() + self.max_wait_s
    while n < self.max_texts:
      try:
        item = self.queue.get_nowait()
      except asyncio.QueueEmpty:
        left = deadline - time.monotonic()
        if left <= 0:
          break
        try:
          item = await asyncio.wait_for(self.queue.get(), left)
        except asyncio.TimeoutError:
          break
      batch.append(item)
      n += len(item.texts)
    return batch

  async def _loop(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      batch = await self._collect()
      self.waiting -= sum(len(p.texts) for p in batch)
      groups: dict[tuple, list[_Pending]] = {}
      for p in batch:
        if not p.future.done():          # its client gave up (timeout, disconnect)
          groups.setdefault(p.key, []).append(p)
      for key, items in groups.items():
        texts = [t for p in items for t in p.texts]
        self.observe(key[0], len(items), len(texts))
        try:
          results = await loop.run_in_executor(self.executor, self.run, key, texts)
        except Exception as e:  # pylint: disable=broad-except  # handed to each request
          for p in items:
            if not p.future.done():
              p.future.set_exception(e)
          continue
        start = 0
        for p in items:
          if not p.future.done():
            p.future.set_result(results[start:start + len(p.texts)])
          start += len(p.texts)


# ---------------------------------------------------------------------------------------------
# Request and response models (bounds from the export and the limits, so the OpenAPI schema
# states them).


def _models(exp, limits: Limits) -> dict[str, type[pydantic.BaseModel]]:
  strict = pydantic.ConfigDict(extra="forbid", strict=True)
  Desc = pydantic.constr(min_length=1, max_length=limits.max_text_chars)
  Strategy = Literal[tuple(exp.strategies)]  # type: ignore[valid-type]
  Score = Optional[float]

  class GenerateRequest(pydantic.BaseModel):
    model_config = strict
    descriptions: Union[Desc, pydantic.conlist(Desc, min_length=1,  # type: ignore[valid-type]
                                               max_length=limits.max_texts)] = pydantic.Field(
        description="One description or a list of them.")
    strategy: Strategy = "greedy"  # type: ignore[valid-type]
    max_new_tokens: Optional[pydantic.conint(ge=1, le=exp.lengths[-1])] = None
    num_samples: pydantic.conint(ge=1, le=limits.max_samples) = 1
    temperature: pydantic.confloat(gt=0, le=100, allow_inf_nan=False) = 1.0
    top_p: pydantic.confloat(gt=0, le=1, allow_inf_nan=False) = 1.0
    length_penalty: pydantic.confloat(ge=0, le=10, allow_inf_nan=False) = 1.0
    rerank: bool = False
    drop_unparsable: bool = False
    seed: pydantic.conint(ge=0, le=2**31 - 1) = 0

  class Candidate(pydantic.BaseModel):
    code: str
    score: Score = pydantic.Field(description="Length-penalised log-probability; null when the "
                                              "code was cut at max_new_tokens.")
    align: Score = pydantic.Field(description="Description-code cosine (with rerank).")
    parses: bool

  class GenerateResult(pydantic.BaseModel):
    candidates: list[Candidate]

  class GenerateResponse(pydantic.BaseModel):
    results: list[GenerateResult]
    step: Optional[int] = None

  class EmbedRequest(pydantic.BaseModel):
    model_config = strict
    texts: pydantic.conlist(pydantic.constr(max_length=limits.max_code_chars),  # type: ignore
                            min_length=1, max_length=limits.max_texts)
    kind: Literal["desc", "code"] = "desc"

  class EmbedResponse(pydantic.BaseModel):
    vectors: list[list[float]]
    dim: int

  class SearchRequest(pydantic.BaseModel):
    model_config = strict
    query: Union[Desc, pydantic.conlist(Desc, min_length=1,  # type: ignore[valid-type]
                                        max_length=limits.max_texts)]
    k: pydantic.conint(ge=1, le=limits.max_top_k) = 10

  class Hit(pydantic.BaseModel):
    rank: int
    score: float
    name: str = ""
    path: str = ""
    lineno: int = 0
    description: str = ""
    code: str = ""

  class SearchResult(pydantic.BaseModel):
    hits: list[Hit]

  class SearchResponse(pydantic.BaseModel):
    results: list[SearchResult]

  class Health(pydantic.BaseModel):
    status: str
    step: Optional[int]
    programs: int
    index_items: int

  class Error(pydantic.BaseModel):
    detail: str

  return {k: v for k, v in locals().items() if isinstance(v, type)}


# ---------------------------------------------------------------------------------------------
# The app.


def _clean(x: Any) -> Any:
  """JSON-safe: lone surrogates (which UTF-8 cannot hold) -> U+FFFD, non-finite floats -> None."""
  if isinstance(x, str):
    return _SURROGATE.sub("\ufffd", x)
  if isinstance(x, float):
    return x if math.isfinite(x) else None
  if isinstance(x, dict):
    return {k: _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  return x


class _BodyLimit:
  """ASGI middleware, before any parsing: bodies over `limit` bytes get 413, non-JSON content
  types 415, non-UTF-8 bodies 400."""

  def __init__(self, app, limit: int):
    self.app, self.limit = app, limit

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
      return await self.app(scope, receive, send)
    headers = dict(scope.get("headers", ()))
    media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
    if scope["method"] == "POST" and media != b"application/json" and not media.endswith(
        b"+json"):
      return await _send_error(send, 415, "Send a JSON body with Content-Type: "
                                          "application/json.")
    for name, value in headers.items():
      if name == b"content-length":
        try:
          declared = int(value)
        except ValueError:
          return await _send_error(send, 400, "The Content-Length header is not a number.")
        if declared > self.limit:
          return await _send_error(send, 413, f"The request body is {declared} bytes; the "
                                              f"limit is {self.limit}.")
    chunks, size = [], 0
    while True:
      message = await receive()
      if message["type"] == "http.disconnect":
        return None
      chunk = message.get("body", b"")
      size += len(chunk)
      if size > self.limit:
        return await _send_error(send, 413, f"The request body is over the {self.limit} byte "
                                            "limit.")
      chunks.append(chunk)
      if not message.get("more_body"):
        break
    body = b"".join(chunks)
    try:
      body.decode("utf-8")
    except UnicodeDecodeError as e:
      return await _send_error(send, 400, f"The request body is not valid UTF-8 (byte "
                                          f"{e.start}).")
    sent = False

    async def replay():
      nonlocal sent
      if not sent:
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
      return await receive()
    return await self.app(scope, replay, send)


async def _send_error(send, status: int, detail: str) -> None:
  response = JSONResponse({"detail": detail}, status_code=status)
  await send({"type": "http.response.start", "status": status,
              "headers": [(k.encode("latin-1"), v.encode("latin-1"))
                          for k, v in response.headers.items()]})
  await send({"type": "http.response.body", "body": response.body})


def _validation_detail(exc: RequestValidationError) -> tuple[int, str]:
  errors = exc.errors()
  if any(e.get("type") == "json_invalid" for e in errors):
    return 400, "The request body is not valid JSON."
  parts = []
  for e in errors[:3]:
    where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
    parts.append(f"{where}: {e.get('msg', 'invalid')}")
  return 422, "Invalid request: " + "; ".join(parts) + "."


def create_app(exp, limits: Limits | None = None) -> FastAPI:
  """The API over a loaded export (serving.Export), its search index if it has one."""
  limits = limits or Limits()
  m = _models(exp, limits)
  registry = prometheus_client.CollectorRegistry()
  requests_total = prometheus_client.Counter(
      "fac_requests", "HTTP requests by route and status.", ["route", "status"],
      registry=registry)
  latency = prometheus_client.Histogram(
      "fac_request_seconds", "Request latency by route.", ["route"], registry=registry,
      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
  batch_texts = prometheus_client.Histogram(
      "fac_batch_size", "Texts (descriptions, samples excluded) per model call.", ["kind"],
      registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
  batch_requests = prometheus_client.Histogram(
      "fac_batch_requests", "Requests merged into one model call.", ["kind"],
      registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64))

  def observe(kind: str, n_requests: int, n_texts: int) -> None:
    batch_texts.labels(kind).observe(n_texts)
    batch_requests.labels(kind).observe(n_requests)

  def run(key: tuple, texts: list[str]) -> list[Any]:
    kind, opts = key[0], dict(key[1:])
    if kind == "generate":
      return exp.generate(texts, **opts)
    if kind == "embed":
      return list(exp.embed(texts, kind=opts["kind"]))
    return exp.search(texts, k=opts["k"])

  batcher = Batcher(run, max_texts=exp.batch_buckets[-1], max_wait_s=limits.max_wait_ms / 1e3,
                    max_queue=limits.max_queue_texts, observe=observe)

  async def lifespan(_app):
    batcher.start()
    yield
    await batcher.stop()

  app = FastAPI(title="flax_albert_code", version=str(exp.manifest.get("versions", {}).get(
      "flax_albert_code") or "unknown"), lifespan=lifespan,
      description="Python code from descriptions, and description/code embeddings and search.")
  app.state.export, app.state.limits, app.state.registry = exp, limits, registry
  errors = {c: {"model": m["Error"]} for c in (400, 408, 413, 422, 429)}

  async def submit(route: str, texts: list[str], **opts) -> list[Any]:
    key = (route, *sorted(opts.items()))
    try:
      return await asyncio.wait_for(batcher.submit(key, texts), limits.request_timeout_s)
    except asyncio.TimeoutError:
      raise ApiError(408, f"The request took over {limits.request_timeout_s:g} s; send fewer "
                          "texts or fewer tokens.") from None
    except ValueError as e:      # the export's one-sentence checks
      raise ApiError(422, str(e)) from None

  @app.middleware("http")
  async def count(request: Request, call_next):
    start = time.perf_counter()
    response = await call_next(request)
    route = request.scope.get("route")
    path = getattr(route, "path", "other")
    requests_total.labels(path, str(response.status_code)).inc()
    latency.labels(path).observe(time.perf_counter() - start)
    return response

  @app.exception_handler(ApiError)
  async def api_error(_request: Request, exc: ApiError):
    return JSONResponse({"detail": exc.detail}, status_code=exc.status)

  @app.exception_handler(RequestValidationError)
  async def invalid(_request: Request, exc: RequestValidationError):
    status, detail = _validation_detail(exc)
    return JSONResponse({"detail": detail}, status_code=status)

  @app.exception_handler(StarletteHTTPException)
  async def http_error(_request: Request, exc: StarletteHTTPException):
    return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))

  @app.post("/v1/generate", response_model=m["GenerateResponse"], responses=errors)
  async def generate(req: m["GenerateRequest"]):  # type: ignore[valid-type]
    texts = [req.descriptions] if isinstance(req.descriptions, str) else list(req.descriptions)
    opts = dict(strategy=req.strategy, num_samples=req.num_samples,
                temperature=req.temperature, top_p=req.top_p, rerank=req.rerank,
                max_new_tokens=req.max_new_tokens, seed=req.seed,
                length_penalty=req.length_penalty, drop_unparsable=req.drop_unparsable)
    try:
      exp.check_generate(texts, **{k: opts[k] for k in (
          "strategy", "num_samples", "temperature", "top_p", "max_new_tokens",
          "length_penalty")})
    except ValueError as e:
      raise ApiError(422, str(e)) from None
    results = await submit("generate", texts, **opts)
    return _clean({"results": [{"candidates": c} for c in results], "step": exp.step})

  @app.post("/v1/embed", response_model=m["EmbedResponse"], responses=errors)
  async def embed(req: m["EmbedRequest"]):  # type: ignore[valid-type]
    if req.kind == "desc" and any(not t.strip() for t in req.texts):
      raise ApiError(422, "Descriptions to embed must not be empty.")
    vectors = await submit("embed", list(req.texts), kind=req.kind)
    return {"vectors": [np.asarray(v, np.float64).tolist() for v in vectors],
            "dim": exp.align_dim}

  @app.post("/v1/search", response_model=m["SearchResponse"], responses=errors)
  async def search(req: m["SearchRequest"]):  # type: ignore[valid-type]
    if exp.index is None:
      raise ApiError(400, "This server has no search index; start it with --index.")
    queries = [req.query] if isinstance(req.query, str) else list(req.query)
    if any(not q.strip() for q in queries):
      raise ApiError(422, "Queries must not be empty.")
    hits = await submit("search", queries, k=req.k)
    return _clean({"results": [{"hits": h} for h in hits]})

  @app.get("/healthz", response_model=m["Health"])
  async def healthz():
    return {"status": "ok", "step": exp.step, "programs": len(exp.manifest["programs"]),
            "index_items": 0 if exp.index is None else len(exp.index.items)}

  @app.get("/metrics", response_class=Response)
  async def metrics():
    return Response(prometheus_client.generate_latest(registry),
                    media_type=prometheus_client.CONTENT_TYPE_LATEST)

  page = importlib.resources.files("flax_albert_code").joinpath(
      "static/playground.html").read_text(encoding="utf-8")

  @app.get("/", response_class=HTMLResponse, include_in_schema=False)
  async def playground():
    return HTMLResponse(page)

  app.add_middleware(_BodyLimit, limit=limits.max_body_bytes)
  return app
