"""Serving on the GPU (issue 21): latency and throughput of the HTTP server over an export.

  python3 benchmarks/bench_serving.py --export DIR --out serving.json
  python3 benchmarks/bench_serving.py --make-export RUN --export DIR --out serving.json
      # first exports RUN's latest checkpoint to DIR: greedy only, bf16 CUDA programs on a GPU
      # (float32 CPU ones otherwise), batch buckets --buckets, one length (--new-tokens)

The server (`deploy/server.py`'s FastAPI app, the one `python -m flax_albert_code.serve` runs)
listens on loopback in this process, run by uvicorn in a thread; clients are threads with one
keep-alive HTTP connection each, every request one description, greedy, --new-tokens new
tokens. Two server configurations over the same loaded export (compiled once):
  batched        the server as shipped: its batcher merges the requests that arrive within
                 --max-wait-ms into one model call of up to the export's largest batch bucket;
  one_at_a_time  the same app with a batcher of at most one text a call (the export is handed
                 to `create_app` with one batch bucket, [1]: every call runs alone, padded to
                 the export's smallest bucket).
For each, 1, 4 and 16 closed-loop clients (--clients) for --seconds each, after one untimed
request per client: latency p50/p99, requests/s and new tokens/s.

The API cannot force a length (EOS ends a sequence, and the decoding loop stops once every row
of a call has ended), so new tokens are the ones actually generated: per description, the
tokens (its EOS included) of the same greedy decoding run once up front; a response whose code
differs from that reference (bf16 batched differently) is counted by re-tokenising its code.

Parity: the export's greedy tokens against `CodeGenerator` (inference/generator.py) built from
the export's own config.json, weights and tokenizer, on the same descriptions, retrieval off in
both (CodeGenerator retrieves from a run's prepared data, which an export does not carry).

Prints a table, writes JSON (--out) and the "## Serving on the GPU (issue 21)" section of
--results (default benchmarks/RESULTS.md; '' for none).
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import importlib.util
import json
import os
import platform
import sys
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

HEADING = "## Serving on the GPU (issue 21)"
NEEDS = ("fastapi", "uvicorn", "prometheus_client", "pydantic", "jax", "safetensors")
DESCRIPTIONS = [
    "return the sum of two integers", "reverse a string", "read a file and return its lines",
    "sort a list of numbers in descending order", "merge two dictionaries into a new one",
    "parse an ISO date string into a date object", "count the words in a text",
    "check whether a number is prime", "return the n-th Fibonacci number",
    "flatten a nested list", "remove duplicate items from a list keeping their order",
    "convert a temperature from Celsius to Fahrenheit", "return the largest value in a list",
    "compute the factorial of n", "check whether a string is a palindrome",
    "split a path into directory and file name", "write a dictionary to a JSON file",
    "load a JSON file and return its contents", "return the current time as a string",
    "compute the mean of a list of numbers", "find the index of an item in a sorted list",
    "return the lines of a file that contain a word", "encode a string as base64",
    "compute the sha256 digest of a file", "return the keys of a dictionary sorted by value",
    "create a directory if it does not exist", "join a list of strings with commas",
    "return the extension of a file name", "check whether a key is in a dictionary",
    "convert a list of pairs into a dictionary", "strip whitespace from every line of a text",
    "return the difference between two dates in days"]


def need(modules=NEEDS) -> None:
  """Exits with one sentence naming what is missing, before any work."""
  missing = [m for m in modules if importlib.util.find_spec(m) is None]
  if missing:
    sys.exit(f"error: bench_serving.py needs {', '.join(missing)}, which this Python "
             f"({sys.executable}) cannot import; pip install 'flax_albert_code[serve]' (FastAPI, "
             "uvicorn, prometheus-client) or run it where the server runs.")


def replace_section(path: str, heading: str, text: str) -> None:
  """Replaces the section starting with `heading` (up to the next '## ') or appends it."""
  old = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
  start = old.find(heading)
  if start < 0:
    new = old.rstrip("\n") + ("\n\n" if old else "") + text.rstrip("\n") + "\n"
  else:
    end = old.find("\n## ", start + len(heading))
    new = old[:start] + text.rstrip("\n") + "\n" + (old[end:] if end >= 0 else "")
  with open(path, "w", encoding="utf-8") as f:
    f.write(new)


def card() -> str:
  """The accelerator's name (nvidia-smi's, as JAX reports it), or the CPU's."""
  import jax  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  if dev.platform != "cpu":
    return f"{dev.device_kind} ({jax.device_count()} visible)"
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return f"CPU: {line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
  except OSError:
    pass
  return f"CPU: {platform.processor() or 'unknown'}, {os.cpu_count()} cores"


def versions() -> dict:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  out = {"python": platform.python_version()}
  for p in ("jax", "jaxlib", "flax", "fastapi", "uvicorn"):
    try:
      out[p] = metadata.version(p)
    except metadata.PackageNotFoundError:
      out[p] = None
  return out


# ---------------------------------------------------------------------------------------------
# The export, the reference outputs and the parity check.


def make_export(checkpoint: str, out: str, new_tokens: int, buckets: list[int]) -> str:
  """Exports `checkpoint` for this machine: bf16 CUDA programs on a GPU, float32 CPU ones."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax_albert_code.deploy import writer  # pylint: disable=import-outside-toplevel
  here = jax.export.default_export_platform()      # cpu, cuda, rocm or tpu
  return writer.export(checkpoint, out, dtype="float32" if here == "cpu" else "bfloat16",
                       buckets=buckets, lengths=[new_tokens], strategies=["greedy"],
                       platforms=[here], hf_encoder=False)


def reference(exp, descs: list[str], new_tokens: int, retrieve: bool | None
              ) -> dict[str, tuple[str, int]]:
  """{description: (code, new tokens incl. EOS)} of one greedy call over all of them."""
  from flax_albert_code.config import EOS_ID  # pylint: disable=import-outside-toplevel
  used = exp.retrieves(retrieve)
  nbs = exp.retrieve(descs) if used else None
  tokens, _ = exp.generate_tokens(
      descs, max_new_tokens=new_tokens,
      neighbour_tokens=None if nbs is None else [[n["tokens"] for n in x] for x in nbs])
  out = {}
  for d, row in zip(descs, tokens[:, 0, :new_tokens]):
    eos = np.flatnonzero(row == EOS_ID)
    out[d] = (exp.tokenizer.decode(row.tolist()), int(eos[0]) + 1 if len(eos) else new_tokens)
  return out


def parity(exp, descs: list[str], new_tokens: int) -> dict:
  """The export's greedy outputs vs CodeGenerator's on the export's weights, config and
  tokenizer (retrieval off in both): code (its tokens decoded), finish reason, score."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from flax_albert_code.inference.generator import (  # pylint: disable=import-outside-toplevel
      CodeGenerator)
  with open(os.path.join(exp.path, "config.json"), encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  gen = CodeGenerator(config, exp.variables, exp.tokenizer)
  kw = dict(max_new_tokens=new_tokens, retrieve=False, repetition_penalty=1.0)
  ours = [c[0] for c in exp.generate(descs, **kw)]
  theirs = [c[0] for c in gen.generate(descs, no_repeat_ngram_size=exp.no_repeat_ngram_size,
                                       **kw)]
  same = [a["code"] == b["code"] and a["finish_reason"] == b["finish_reason"]
          for a, b in zip(ours, theirs)]
  diffs = [abs(a["score"] - b["score"]) for a, b in zip(ours, theirs)
           if a["score"] is not None and b["score"] is not None]
  return {"descriptions": len(descs), "equal": sum(same), "all_equal": all(same),
          "max_score_difference": max(diffs) if diffs else None,
          "retrieval": "off in both", "dtype": exp.manifest.get("dtype")}


# ---------------------------------------------------------------------------------------------
# The server and its clients.


class OneAtATime:
  """An export as `create_app` sees it with one batch bucket, so its batcher sends the model
  one text a call; everything else (generate included) is the export's own."""
  batch_buckets = [1]

  def __init__(self, exp):
    self._exp = exp

  def __getattr__(self, name):
    return getattr(self._exp, name)


class LocalServer:
  """uvicorn serving `app` on a free loopback port, in a thread of this process."""

  def __init__(self, app, timeout: float = 60.0):
    import uvicorn  # pylint: disable=import-outside-toplevel
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                            timeout_graceful_shutdown=5)
    self.server = uvicorn.Server(config)
    self.thread = threading.Thread(target=self.server.run, daemon=True, name="uvicorn")
    self.thread.start()
    deadline = time.time() + timeout
    while not self.server.started:
      if not self.thread.is_alive() or time.time() > deadline:
        raise RuntimeError("The server did not start (see the log above).")
      time.sleep(0.05)
    self.port = self.server.servers[0].sockets[0].getsockname()[1]

  def stop(self) -> None:
    self.server.should_exit = True
    self.thread.join(30)


def _post(conn: http.client.HTTPConnection, body: dict) -> dict:
  conn.request("POST", "/v1/generate", json.dumps(body),
               {"Content-Type": "application/json"})
  r = conn.getresponse()
  data = r.read()
  if r.status != 200:
    raise RuntimeError(f"POST /v1/generate answered {r.status}: {data[:300]!r}")
  return json.loads(data)


def model_calls(registry) -> tuple[float, float]:
  """(generate calls, texts in them) the server's Prometheus registry has counted so far."""
  get = lambda name: registry.get_sample_value(name, {"kind": "generate"}) or 0.0
  return get("fac_batch_size_count"), get("fac_batch_size_sum")


def load(port: int, clients: int, seconds: float, descs: list[str], body: dict,
         ref: dict[str, tuple[str, int]], tokenizer) -> dict:
  """`clients` closed-loop clients for `seconds` (each sends at least one timed request)."""
  state: dict[str, float] = {}

  def go() -> None:      # run by the last thread to reach the barrier, before any passes it
    state["start"] = time.perf_counter()
    state["deadline"] = state["start"] + seconds

  barrier = threading.Barrier(clients + 1, action=go)
  records: list[list[tuple[float, float, int, bool]]] = [[] for _ in range(clients)]
  errors: list[str] = []

  def client(c: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
      _post(conn, {**body, "descriptions": descs[c % len(descs)]})    # untimed: warm
      barrier.wait()
      i = c
      while time.perf_counter() < state["deadline"] or not records[c]:
        d = descs[i % len(descs)]
        i += clients
        t0 = time.perf_counter()
        cand = _post(conn, {**body, "descriptions": d})["results"][0]["candidates"][0]
        t1 = time.perf_counter()
        code, n = ref[d]
        same = cand["code"] == code
        if not same:   # batched differently (bf16): its own tokens, re-tokenised
          n = min(len(tokenizer.encode(cand["code"])) + (cand["finish_reason"] == "eos"),
                  body["max_new_tokens"])
        records[c].append((t0, t1, n, same))
    except Exception as e:  # pylint: disable=broad-except  # reported after the run
      errors.append(f"{type(e).__name__}: {e}")
      try:
        barrier.abort()
      except threading.BrokenBarrierError:
        pass
    finally:
      conn.close()

  threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
  for t in threads:
    t.start()
  try:
    barrier.wait()
  except threading.BrokenBarrierError:
    pass
  for t in threads:
    t.join()
  if errors:
    raise RuntimeError(f"{len(errors)} of {clients} clients failed; first: {errors[0]}")
  flat = [r for rs in records for r in rs]
  elapsed = max(t1 for _, t1, _, _ in flat) - state["start"]
  lat = np.array([t1 - t0 for t0, t1, _, _ in flat])
  tokens = sum(n for _, _, n, _ in flat)
  return {"clients": clients, "requests": len(flat), "seconds": elapsed,
          "latency_p50_ms": float(np.percentile(lat, 50) * 1e3),
          "latency_p99_ms": float(np.percentile(lat, 99) * 1e3),
          "latency_mean_ms": float(lat.mean() * 1e3),
          "requests_per_s": len(flat) / elapsed, "new_tokens": tokens,
          "new_tokens_per_request": tokens / len(flat), "new_tokens_per_s": tokens / elapsed,
          "same_as_reference": sum(s for *_, s in flat)}


def warm(exp, descs: list[str], new_tokens: int, retrieve: bool | None, largest: int) -> float:
  """Compiles the programs the runs use: every batch bucket up to the one holding `largest`."""
  t0 = time.perf_counter()
  for b in exp.batch_buckets:
    exp.generate((descs * (b // len(descs) + 1))[:b], max_new_tokens=new_tokens,
                 retrieve=retrieve)
    if b >= largest:
      break
  return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Report.


def table(res: dict) -> list[str]:
  rows = ["| server | clients | requests | p50 ms | p99 ms | requests/s | new tokens/s | "
          "tokens/request | texts/model call |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for mode, cells in res["runs"].items():
    for r in cells:
      rows.append(f"| {mode} | {r['clients']} | {r['requests']} | {r['latency_p50_ms']:.1f} | "
                  f"{r['latency_p99_ms']:.1f} | {r['requests_per_s']:.2f} | "
                  f"{r['new_tokens_per_s']:,.0f} | {r['new_tokens_per_request']:.1f} | "
                  f"{r['texts_per_model_call']:.2f} |")
  return rows


def markdown(res: dict) -> str:
  g, p = res["goal"], res["parity"]
  v = res["versions"]
  lines = [
      HEADING, "",
      f"`python3 benchmarks/bench_serving.py --export DIR` on {res['card']}, {res['date']}; "
      f"jax {v['jax']}, flax {v['flax']}, fastapi {v['fastapi']}, uvicorn {v['uvicorn']}, "
      f"Python {v['python']}.", "",
      f"Export: {res['export']['path']} (step {res['export']['step']}, {res['export']['dtype']}, "
      f"{res['export']['platform']} programs, batch buckets {res['export']['batch_buckets']}, "
      f"retrieval {res['retrieve']}). Each request: one description, greedy, max_new_tokens "
      f"{res['new_tokens']}; EOS cannot be disabled through the API, so tokens/s counts the "
      "tokens actually generated (tokens/request). Server in-process on loopback (uvicorn in a "
      f"thread), closed-loop clients with keep-alive connections, {res['seconds']:g} s a row "
      f"after one untimed request per client. batched: the shipped batcher (window "
      f"{res['max_wait_ms']:g} ms, up to {res['export']['batch_buckets'][-1]} texts a call); "
      "one_at_a_time: the same app, one text a model call.", "",
      *table(res), "",
      f"Single request (1 client): p50 {g['single_p50_ms']:.1f} ms, p99 "
      f"{g['single_p99_ms']:.1f} ms one at a time; p50 {g['single_batched_p50_ms']:.1f} ms with "
      "batching (its window waits for company). Issue's goal, >= 8x throughput at "
      f"{g['clients']} clients with batching "
      f"vs one at a time: {g['speedup_requests_per_s']:.2f}x requests/s, "
      f"{g['speedup_new_tokens_per_s']:.2f}x new tokens/s: "
      f"{'met' if g['met'] else 'not met'}.", "",
      f"Parity: greedy from the export vs `CodeGenerator` on the export's weights, config and "
      f"tokenizer ({p['retrieval']}): {p['equal']} of {p['descriptions']} descriptions give "
      f"the same code and finish reason ({'equal' if p['all_equal'] else 'NOT equal'}; "
      f"largest score difference {p['max_score_difference'] or 0:.2g}). "
      f"Server responses equal to the reference (all descriptions in one call): "
      f"{res['same_as_reference']} of {res['responses']}.", ""]
  return "\n".join(lines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--export", required=True, help="export directory (written with --make-export)")
  ap.add_argument("--make-export", default="", metavar="RUN",
                  help="first export this training workdir or checkpoint to --export")
  ap.add_argument("--buckets", default="1,4,8,16",
                  help="batch buckets of --make-export's export")
  ap.add_argument("--out", default="", help="write the results as JSON here")
  ap.add_argument("--results", default=os.path.join(REPO, "benchmarks", "RESULTS.md"),
                  help="RESULTS.md whose serving section to write ('' for none)")
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--clients", default="1,4,16")
  ap.add_argument("--seconds", type=float, default=5.0, help="timed seconds per row")
  ap.add_argument("--max-wait-ms", type=float, default=None,
                  help="the batching window (default: the server's)")
  ap.add_argument("--retrieve", choices=("default", "on", "off"), default="default",
                  help="requests' retrieve field (default: the export's default)")
  ap.add_argument("--parity-descriptions", type=int, default=8)
  args = ap.parse_args(argv)
  need()
  import jax  # pylint: disable=import-outside-toplevel
  from flax_albert_code.deploy import runtime, server  # pylint: disable=import-outside-toplevel
  from flax_albert_code.deploy.limits import Limits  # pylint: disable=import-outside-toplevel
  from flax_albert_code import cli  # pylint: disable=import-outside-toplevel
  cli.quiet_logs()
  clients = [int(x) for x in args.clients.split(",") if x.strip()]
  t_start = time.perf_counter()
  if args.make_export:
    t0 = time.perf_counter()
    make_export(args.make_export, args.export, args.new_tokens,
                [int(b) for b in args.buckets.split(",") if b.strip()])
    print(f"exported {args.make_export} to {args.export} in {time.perf_counter() - t0:.1f} s",
          flush=True)
  try:
    exp = runtime.load_export(args.export)
  except (ValueError, OSError) as e:
    sys.exit(f"error: {e}")
  new_tokens = min(args.new_tokens, exp.lengths[-1])
  if new_tokens != args.new_tokens:
    print(f"note: the export's longest program is {exp.lengths[-1]} tokens; asking for "
          f"{new_tokens}", flush=True)
  retrieve = {"default": None, "on": True, "off": False}[args.retrieve]
  try:
    used = exp.retrieves(retrieve)
  except ValueError as e:
    sys.exit(f"error: {e} (--retrieve)")
  limits = Limits(request_timeout_s=600.0, **(
      {} if args.max_wait_ms is None else {"max_wait_ms": args.max_wait_ms}))
  descs = DESCRIPTIONS
  warm_s = warm(exp, descs, new_tokens, retrieve, max(clients))
  print(f"compiled and ran the programs of buckets up to {max(clients)} in {warm_s:.1f} s",
        flush=True)
  ref = reference(exp, descs, new_tokens, retrieve)
  t0 = time.perf_counter()
  par = parity(exp, descs[:args.parity_descriptions], new_tokens)
  print(f"parity with CodeGenerator: {par['equal']} of {par['descriptions']} the same "
        f"({time.perf_counter() - t0:.1f} s)", flush=True)
  body = {"max_new_tokens": new_tokens, "strategy": "greedy"}
  if retrieve is not None:
    body["retrieve"] = retrieve
  runs = {}
  for mode, view in (("batched", exp), ("one_at_a_time", OneAtATime(exp))):
    app = server.create_app(view, limits)
    srv = LocalServer(app)
    try:
      runs[mode] = []
      for c in clients:
        calls, texts = model_calls(app.state.registry)
        r = load(srv.port, c, args.seconds, descs, body, ref, exp.tokenizer)
        calls2, texts2 = model_calls(app.state.registry)
        # Untimed warm requests included: how the batcher grouped this row's requests.
        r["model_calls"] = calls2 - calls
        r["texts_per_model_call"] = (texts2 - texts) / max(calls2 - calls, 1)
        runs[mode].append(r)
        print(f"{mode:>14} {c:>3} clients: {r['requests_per_s']:8.2f} req/s "
              f"{r['new_tokens_per_s']:10,.0f} new tok/s  p50 {r['latency_p50_ms']:8.1f} ms  "
              f"p99 {r['latency_p99_ms']:8.1f} ms  {r['texts_per_model_call']:5.2f} texts/call",
              flush=True)
    finally:
      srv.stop()
  top = max(clients)
  b = next(r for r in runs["batched"] if r["clients"] == top)
  o = next(r for r in runs["one_at_a_time"] if r["clients"] == top)
  single = next((r for r in runs["one_at_a_time"] if r["clients"] == 1),
                runs["one_at_a_time"][0])
  single_b = next((r for r in runs["batched"] if r["clients"] == 1), runs["batched"][0])
  dev = jax.devices()[0]
  res = {
      "card": card(), "date": datetime.datetime.now(datetime.timezone.utc).strftime(
          "%Y-%m-%d %H:%M UTC"), "versions": versions(),
      "export": {"path": exp.path, "step": exp.step, "dtype": exp.manifest.get("dtype"),
                 "platform": dev.platform, "batch_buckets": exp.batch_buckets,
                 "lengths": exp.lengths, "retrieval_k": exp.retrieval_k},
      "new_tokens": new_tokens, "retrieve": "on" if used else "off",
      "seconds": args.seconds, "max_wait_ms": limits.max_wait_ms, "warm_s": warm_s,
      "parity": par, "runs": runs,
      "responses": sum(r["requests"] for rs in runs.values() for r in rs),
      "same_as_reference": sum(r["same_as_reference"] for rs in runs.values() for r in rs),
      "goal": {"clients": top, "single_p50_ms": single["latency_p50_ms"],
               "single_p99_ms": single["latency_p99_ms"],
               "single_batched_p50_ms": single_b["latency_p50_ms"],
               "speedup_requests_per_s": b["requests_per_s"] / o["requests_per_s"],
               "speedup_new_tokens_per_s": b["new_tokens_per_s"] / o["new_tokens_per_s"],
               "met": b["requests_per_s"] / o["requests_per_s"] >= 8.0},
      "wall_s": time.perf_counter() - t_start}
  text = markdown(res)
  print()
  print(text)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(res, f, indent=1)
  if args.results:
    replace_section(args.results, HEADING, text)
    print(f"wrote the serving section of {args.results}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
