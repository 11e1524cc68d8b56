"""The HTTP JSON API over an export: FastAPI app, dynamic batching, limits, Prometheus metrics.

  app = create_app(load_export("exports/small"), Limits(max_wait_ms=10))
  uvicorn.run(app, host="127.0.0.1", port=8000)      # what `python -m flax_albert_code.serve` does

Requests with the same options that arrive within `max_wait_ms` share model calls, run on one
worker thread so the event loop keeps accepting requests; each text's samples are drawn with
keys of its own request's seed, so they are the same alone or batched. Every limit is refused
with a 4xx JSON error {"detail": "..."}.
"""
# No `from __future__ import annotations`: FastAPI reads the handlers' annotations, which name
# models built inside create_app.
import asyncio
import concurrent.futures
import contextlib
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
from starlette.exceptions import HTTPException

from flax_albert_code.deploy.limits import Limits
from flax_albert_code.inference import options

log = logging.getLogger(__name__)
_SURROGATE = re.compile("[\ud800-\udfff]")



@dataclasses.dataclass
class _Pending:
  key: tuple
  texts: list[Any]
  future: asyncio.Future
  results: list[Any] = dataclasses.field(default_factory=list)   # of texts[:len(results)]


class Batcher:
  """Merges concurrent requests with the same key into `run(key, texts)` calls on one worker
  thread, at most `max_texts` texts a call; a request whose client gave up is dropped between
  calls, so the requests behind it do not wait for its work."""

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
      with contextlib.suppress(asyncio.CancelledError):
        await self.task
    self.executor.shutdown(wait=False, cancel_futures=True)

  async def submit(self, key: tuple, texts: list[str]) -> list[Any]:
    if self.waiting + len(texts) > self.max_queue:
      raise HTTPException(429, f"The server has {self.waiting} texts waiting for the model; "
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
        groups.setdefault(p.key, []).append(p)
      for key, items in groups.items():
        await self._run_group(loop, key, items)

  async def _run_group(self, loop, key: tuple, items: list[_Pending]) -> None:
    while True:
      live = [p for p in items if not p.future.done()]
      if not live:
        return
      texts, owners = [], []
      for p in live:
        take = min(len(p.texts) - len(p.results), self.max_texts - len(texts))
        if take <= 0:
          break
        start = len(p.results)
        texts.extend(p.texts[start:start + take])
        owners.append((p, take))
      self.observe(key[0], len(owners), len(texts))
      try:
        results = await loop.run_in_executor(self.executor, self.run, key, texts)
      except Exception as e:  # pylint: disable=broad-except  # handed to each request
        for p in live:
          if not p.future.done():
            p.future.set_exception(e)
        return
      start = 0
      for p, take in owners:
        p.results.extend(results[start:start + take])
        start += take
        if len(p.results) == len(p.texts) and not p.future.done():
          p.future.set_result(p.results)


# Pydantic checks the requests' shape and types; the decoding options' ranges are
# `options.check`'s (with its messages), stated in the OpenAPI schema from the same numbers.


def _option(default: Any, name: str, description: str = "", **bounds: Any) -> Any:
  """A decoding option's field: its range in the schema, checked by `options.check`."""
  if name in options.RANGES:
    low, low_in, high, high_in = options.RANGES[name]
    bounds = {"minimum" if low_in else "exclusiveMinimum": low,
              "maximum" if high_in else "exclusiveMaximum": high}
  return pydantic.Field(default, description=description or None,
                        json_schema_extra={k: v for k, v in bounds.items() if v is not None})


def _models(exp, limits: Limits) -> dict[str, type[pydantic.BaseModel]]:
  strict = pydantic.ConfigDict(extra="forbid", strict=True)
  Desc = pydantic.constr(max_length=limits.max_text_chars)
  Score = Optional[float]

  class GenerateRequest(pydantic.BaseModel):
    model_config = strict
    descriptions: Union[Desc, pydantic.conlist(Desc, min_length=1,  # type: ignore[valid-type]
                                               max_length=limits.max_texts)] = pydantic.Field(
        description="One description or a list of them.")
    strategy: str = _option("greedy", "strategy", enum=list(exp.strategies))
    max_new_tokens: Optional[int] = _option(None, "max_new_tokens", minimum=1,
                                            maximum=exp.lengths[-1])
    num_samples: int = _option(1, "num_samples", minimum=1, maximum=limits.max_samples)
    num_beams: Optional[int] = _option(
        None, "num_beams", "beam: the export's beam width, fixed when it was exported (null: "
        "that width).", minimum=getattr(exp, "num_beams", None),
        maximum=getattr(exp, "num_beams", None))
    temperature: float = _option(1.0, "temperature")
    top_k: int = _option(0, "top_k", "sample: draw from the k likeliest tokens (0: off).",
                         minimum=0, maximum=getattr(exp, "vocab_size", None))
    top_p: float = _option(1.0, "top_p")
    length_penalty: float = _option(1.0, "length_penalty")
    repetition_penalty: float = _option(
        1.0, "repetition_penalty", "greedy, sample: make tokens already emitted less likely "
        "(1.0: off).")
    rerank: bool = False
    drop_unparsable: bool = False
    retrieve: Optional[bool] = pydantic.Field(
        None, description="Draw on the k nearest functions of the server's index (null: when "
        "the model was trained with retrieval); each candidate then lists them.")
    seed: int = _option(0, "seed", "sample: the same seed gives the same candidates, whatever "
                        "else the server batches with the request.", minimum=0,
                        maximum=options.MAX_SEED)

  class Neighbour(pydantic.BaseModel):
    path: str
    name: str
    lineno: int
    score: Score

  class Candidate(pydantic.BaseModel):
    code: str
    score: Score = pydantic.Field(description="Length-penalised log-probability of the "
                                              "candidate's tokens (null only if not finite).")
    align: Score = pydantic.Field(description="Description-code cosine (with rerank).")
    parses: bool
    finish_reason: Literal["eos", "length"] = pydantic.Field(
        description="eos: the model ended the code; length: max_new_tokens cut it.")
    neighbours: Optional[list[Neighbour]] = pydantic.Field(
        None, description="The retrieved functions the code was written from, best first "
        "(only when the request retrieved).")

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
    retrieves: bool = pydantic.Field(description="Whether generate retrieves by default.")

  class Error(pydantic.BaseModel):
    detail: str

  return {k: v for k, v in locals().items() if isinstance(v, type)}


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
  """ASGI middleware, before any parsing: bodies over `limit` bytes get 413, non-JSON 415,
  non-UTF-8 400."""

  def __init__(self, app, limit: int):
    self.app, self.limit = app, limit

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
      return await self.app(scope, receive, send)

    def refuse(status: int, detail: str):
      return JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)
    headers = dict(scope.get("headers", ()))
    media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
    if scope["method"] == "POST" and media != b"application/json" and not media.endswith(
        b"+json"):
      return await refuse(415, "Send a JSON body with Content-Type: application/json.")
    if b"content-length" in headers:
      try:
        declared = int(headers[b"content-length"])
      except ValueError:
        return await refuse(400, "The Content-Length header is not a number.")
      if declared > self.limit:
        return await refuse(413, f"The request body is {declared} bytes; the limit is "
                                 f"{self.limit}.")
    chunks, size = [], 0
    while True:
      message = await receive()
      if message["type"] == "http.disconnect":
        return None
      chunk = message.get("body", b"")
      size += len(chunk)
      if size > self.limit:
        return await refuse(413, f"The request body is over the {self.limit} byte limit.")
      chunks.append(chunk)
      if not message.get("more_body"):
        break
    body = b"".join(chunks)
    try:
      body.decode("utf-8")
    except UnicodeDecodeError as e:
      return await refuse(400, f"The request body is not valid UTF-8 (byte {e.start}).")
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():
      return pending.pop() if pending else await receive()
    return await self.app(scope, replay, send)


class _Count:
  """ASGI middleware outside _BodyLimit: `observe(path, status, seconds)` for every response,
  refusals included; "500" when the app raised, "disconnected" when it never answered."""

  def __init__(self, app, observe: Callable[[str, str, float], None]):
    self.app, self.observe = app, observe

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    start, status = time.perf_counter(), {}

    async def send_status(message):
      if message["type"] == "http.response.start":
        status["code"] = str(message["status"])
      await send(message)
    try:
      await self.app(scope, receive, send_status)
      status.setdefault("code", "disconnected")      # returned without answering
    finally:
      # Raised before answering: Starlette's outermost middleware answers 500.
      self.observe(scope.get("path", ""), status.get("code", "500"), time.perf_counter() - start)


def _where(loc: tuple) -> str:
  """A pydantic error location for people (`descriptions item 2`), without union-member tags."""
  parts = [f"item {x + 1}" if isinstance(x, int) else str(x) for x in loc
           if x != "body" and not (isinstance(x, str) and ("[" in x or "-" in x))]
  return " ".join(parts) or "body"


def _validation_detail(exc: RequestValidationError) -> tuple[int, str]:
  errors = exc.errors()
  if any(e.get("type") == "json_invalid" for e in errors):
    return 400, "The request body is not valid JSON."
  # A field that is one string or a list of them reports both alternatives; when one of them
  # matched the input's type, its error is the one that says what is wrong.
  fields = {}
  for e in errors:
    fields.setdefault(tuple(e.get("loc", ()))[1:2], []).append(e)
  kept = []
  for group in fields.values():
    typed = [e for e in group if not str(e.get("type", "")).endswith("_type")]
    kept.extend(typed or group)
  parts = [f"{_where(tuple(e.get('loc', ())))}: {e.get('msg', 'invalid')}" for e in kept[:3]]
  return 422, "Invalid request: " + "; ".join(dict.fromkeys(parts)) + "."


def create_app(exp, limits: Limits | None = None, *, docs: bool = False) -> FastAPI:
  """The API over a loaded export. `docs` serves /docs (Swagger UI, whose scripts load from a
  CDN: off by default, so that nothing the server offers needs the internet)."""
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

  def run(key: tuple, texts: list[Any]) -> list[Any]:
    kind, opts = key[0], dict(key[1:])
    if kind == "generate":     # texts: (description, seed, its index in its request)
      return exp.generate([t for t, _, _ in texts], seeds=[(s, i) for _, s, i in texts], **opts)
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
      docs_url="/docs" if docs else None, redoc_url=None,
      description="Python code from descriptions, and description/code embeddings and search.")
  app.state.export, app.state.limits, app.state.registry = exp, limits, registry
  errors = {c: {"model": m["Error"]} for c in (400, 408, 413, 415, 422, 429)}
  # The request models as plain names for the handlers' annotations (FastAPI reads them to parse
  # the body); `m["..."]` in an annotation would read as a string forward reference to linters.
  GenerateRequest, EmbedRequest, SearchRequest = (
      m["GenerateRequest"], m["EmbedRequest"], m["SearchRequest"])

  async def submit(route: str, texts: list[Any], **opts) -> list[Any]:
    key = (route, *sorted(opts.items()))
    try:
      return await asyncio.wait_for(batcher.submit(key, texts), limits.request_timeout_s)
    except asyncio.TimeoutError:
      raise HTTPException(408, f"The request took over {limits.request_timeout_s:g} s; send "
                               "fewer texts or fewer tokens.") from None
    except ValueError as e:      # the export's one-sentence checks
      raise HTTPException(422, str(e)) from None

  async def error(_request: Request, exc: Exception):
    status, detail = (_validation_detail(exc) if isinstance(exc, RequestValidationError)
                      else (exc.status_code, str(exc.detail)))
    return JSONResponse({"detail": detail}, status_code=status,
                        headers=getattr(exc, "headers", None))
  for cls in (RequestValidationError, HTTPException):
    app.add_exception_handler(cls, error)

  # exclude_unset: a candidate lists "neighbours" only when its request retrieved.
  @app.post("/v1/generate", response_model=m["GenerateResponse"], responses=errors,
            response_model_exclude_unset=True)
  async def generate(req: GenerateRequest):  # type: ignore[valid-type]
    texts = [req.descriptions] if isinstance(req.descriptions, str) else list(req.descriptions)
    opts = dict(strategy=req.strategy, num_samples=req.num_samples,
                temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                max_new_tokens=req.max_new_tokens, length_penalty=req.length_penalty,
                repetition_penalty=req.repetition_penalty)
    try:
      exp.check_generate(texts, **opts, seed=req.seed, max_samples=limits.max_samples,
                         retrieve=req.retrieve, num_beams=req.num_beams)
      opts["retrieve"] = exp.retrieves(req.retrieve)   # resolved: one batching key for both
    except ValueError as e:
      raise HTTPException(422, str(e)) from None
    # The seed travels with each text, not in the batching key: requests with other seeds
    # share model calls, and each text's candidates are drawn with keys of its own request.
    results = await submit("generate", [(t, req.seed, i) for i, t in enumerate(texts)],
                           rerank=req.rerank, drop_unparsable=req.drop_unparsable, **opts)
    return _clean({"results": [{"candidates": c} for c in results], "step": exp.step})

  @app.post("/v1/embed", response_model=m["EmbedResponse"], responses=errors)
  async def embed(req: EmbedRequest):  # type: ignore[valid-type]
    if req.kind == "desc" and any(not t.strip() for t in req.texts):
      raise HTTPException(422, "Descriptions to embed must not be empty.")
    vectors = await submit("embed", list(req.texts), kind=req.kind)
    return {"vectors": [np.asarray(v, np.float64).tolist() for v in vectors],
            "dim": exp.align_dim}

  @app.post("/v1/search", response_model=m["SearchResponse"], responses=errors)
  async def search(req: SearchRequest):  # type: ignore[valid-type]
    if exp.index is None:
      raise HTTPException(400, "This server has no search index; start it with --index.")
    queries = [req.query] if isinstance(req.query, str) else list(req.query)
    if any(not q.strip() for q in queries):
      raise HTTPException(422, "Queries must not be empty.")
    hits = await submit("search", queries, k=req.k)
    return _clean({"results": [{"hits": h} for h in hits]})

  @app.get("/healthz", response_model=m["Health"])
  async def healthz():
    return {"status": "ok", "step": exp.step, "programs": len(exp.manifest["programs"]),
            "index_items": 0 if exp.index is None else len(exp.index.items),
            "retrieves": bool(exp.retrieval_k) and exp.index is not None}

  @app.get("/metrics", response_class=Response)
  async def metrics():
    return Response(prometheus_client.generate_latest(registry),
                    media_type=prometheus_client.CONTENT_TYPE_LATEST)

  page = importlib.resources.files("flax_albert_code").joinpath(
      "static/playground.html").read_text(encoding="utf-8")

  @app.get("/", response_class=HTMLResponse, include_in_schema=False)
  async def playground():
    return HTMLResponse(page)

  paths = {getattr(r, "path", None) for r in app.routes}

  def count(path: str, status: str, seconds: float) -> None:
    path = path if path in paths else "other"
    requests_total.labels(path, status).inc()
    latency.labels(path).observe(seconds)

  app.add_middleware(_BodyLimit, limit=limits.max_body_bytes)
  app.add_middleware(_Count, observe=count)     # added last: outermost, sees every refusal
  return app
