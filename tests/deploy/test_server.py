"""The HTTP server over real loopback HTTP: concurrency with dynamic batching, limits, OpenAPI
fuzzing; and the batcher's timeout and queue limits in process with a fake export."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from export_util import CODES, DESCRIPTIONS, Server, request, shared_export


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  return shared_export(tmp_path_factory)[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
  path.write_text("".join(json.dumps({"name": f"f{i}", "path": "m.py", "lineno": i + 1,
                                      "description": d, "code": c}) + "\n"
                          for i, (d, c) in enumerate(zip(DESCRIPTIONS, CODES))))
  return str(path)


@pytest.fixture(scope="module")
def server(exported, corpus, tmp_path_factory):
  log = str(tmp_path_factory.mktemp("serve") / "server.log")
  srv = Server(exported, "--index", corpus, "--max-wait-ms", "25", "--max-texts", "8",
               "--max-body-bytes", "4096", "--max-text-chars", "200", log_path=log)
  yield srv
  srv.stop()


def _metric(text: str, name: str, labels: str) -> dict[str, float]:
  """{le: cumulative count} of a histogram's buckets, plus "count"."""
  out = {}
  for m in re.finditer(rf'^{name}_bucket\{{{labels},le="([^"]+)"\}} (\S+)$', text, re.M):
    out[m.group(1)] = float(m.group(2))
  count = re.search(rf"^{name}_count\{{{labels}\}} (\S+)$", text, re.M)
  out["count"] = float(count.group(1)) if count else 0.0
  return out


def test_concurrent_requests_are_answered_correctly_and_batched(server):
  # The right answers: each description alone (test_export checks the export against the
  # checkpoint); batching must not change them.
  want_code = {}
  for d in DESCRIPTIONS:
    status, data, _ = request(f"{server.url}/v1/generate", {"descriptions": d})
    want_code[d] = json.loads(data)["results"][0]["candidates"][0]
  status, data, _ = request(f"{server.url}/v1/embed", {"texts": CODES, "kind": "code"})
  want_vec = dict(zip(CODES, json.loads(data)["vectors"]))
  rs = random.Random(0)
  jobs = []
  for i in range(200):
    if i % 5 == 4:
      jobs.append(("embed", rs.sample(CODES, 2)))
    else:
      jobs.append(("generate", rs.sample(DESCRIPTIONS, rs.choice((1, 1, 2)))))

  def call(job):
    kind, texts = job
    body = ({"descriptions": texts} if kind == "generate" else {"texts": texts, "kind": "code"})
    status, data, _ = request(f"{server.url}/v1/{kind}", body, timeout=120)
    return job, status, json.loads(data)

  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    answers = list(pool.map(call, jobs))
  for (kind, texts), status, data in answers:
    assert status == 200, data
    if kind == "generate":
      assert len(data["results"]) == len(texts)
      for d, res in zip(texts, data["results"]):
        (cand,) = res["candidates"]
        assert cand["code"] == want_code[d]["code"]
        np.testing.assert_allclose(cand["score"], want_code[d]["score"], rtol=1e-5)
    else:
      np.testing.assert_allclose(data["vectors"], [want_vec[c] for c in texts], atol=1e-5)
  _, text, _ = request(f"{server.url}/metrics")
  merged = _metric(text.decode(), "fac_batch_requests", 'kind="generate"')
  assert merged["count"] > 0 and merged["1.0"] < merged["count"], merged  # some batch > 1
  sizes = _metric(text.decode(), "fac_batch_size", 'kind="generate"')
  assert sizes["1.0"] < sizes["count"]
  assert 'fac_requests_total{route="/v1/generate",status="200"}' in text.decode()


BAD = [
    (b'{"descriptions": ', {}, 400, "not valid JSON"),
    (b'{"descriptions": "\xff\xfe add"}', {}, 400, "not valid UTF-8"),
    (b'{"descriptions": 5}', {}, 422, "descriptions"),
    (b'{"descriptions": "add", "max_new_tokens": "many"}', {}, 422, "max_new_tokens"),
    (b'{"descriptions": "add", "rerank": 1}', {}, 422, "rerank"),
    (b'{"descriptions": "add", "temperature": "hot"}', {}, 422, "temperature"),
    (b'{"descriptions": "add", "colour": "blue"}', {}, 422, "colour: Extra inputs"),
    (b'{"descriptions": "add", "max_new_tokens": 13}', {}, 422,
     "max_new_tokens must be at most 12"),
    (b'{"descriptions": "add", "num_samples": 9}', {}, 422, "num_samples"),
    (b'{"descriptions": "add", "num_samples": 2}', {}, 422, "Greedy decoding gives one"),
    (b'{"descriptions": "add", "strategy": "beam", "num_samples": 3}', {}, 422, "2 beams"),
    (b'{"descriptions": "add", "strategy": "beam", "num_beams": 3}', {}, 422,
     "keeps 2 beams (fixed when it was exported), so num_beams must be 2 or left out, got 3."),
    (b'{"descriptions": "add", "strategy": "nucleus"}', {}, 422, "strategy"),
    (b'{"descriptions": "   "}', {}, 422, "is empty"),
    (b'{"descriptions": []}', {}, 422, "descriptions"),
    (json.dumps({"descriptions": ["a"] * 9}).encode(), {}, 422, "descriptions"),
    (json.dumps({"descriptions": "x" * 201}).encode(), {}, 422, "at most 200 characters"),
    (json.dumps({"descriptions": "x " * 3000}).encode(), {}, 413, "limit is 4096"),
    (b'[1, 2]', {}, 422, "body"),
    (b'{"descriptions": "add"}', {"Content-Type": "text/plain"}, 415, "application/json"),
]


@pytest.mark.parametrize("body, headers, status, words", BAD,
                         ids=[f"{i}-{s}" for i, (_, _, s, _) in enumerate(BAD)])
def test_bad_requests_get_a_4xx_json_error_and_the_server_keeps_serving(server, body, headers,
                                                                         status, words):
  got, data, head = request(f"{server.url}/v1/generate", body, headers=headers)
  assert got == status, data
  assert head.get("content-type", head.get("Content-Type", "")).startswith("application/json")
  assert words in json.loads(data)["detail"]
  ok, data, _ = request(f"{server.url}/v1/generate", {"descriptions": "add two numbers"})
  assert ok == 200 and len(json.loads(data)["results"]) == 1


def test_other_routes(server):
  status, data, _ = request(f"{server.url}/v1/search", {"query": "reverse a string", "k": 3})
  hits = json.loads(data)["results"][0]["hits"]
  assert status == 200 and [h["rank"] for h in hits] == [1, 2, 3]
  assert {h["name"] for h in hits} <= {f"f{i}" for i in range(len(CODES))}
  status, data, _ = request(f"{server.url}/v1/generate", {
      "descriptions": ["add two numbers", "merge two dictionaries"], "strategy": "beam",
      "num_samples": 2, "rerank": True})
  results = json.loads(data)["results"]
  assert status == 200 and [len(r["candidates"]) for r in results] == [2, 2]
  aligns = [c["align"] for c in results[0]["candidates"]]
  assert aligns == sorted(aligns, reverse=True)
  status, data, _ = request(f"{server.url}/healthz")
  assert status == 200 and json.loads(data)["index_items"] == len(CODES)
  status, data, _ = request(f"{server.url}/openapi.json")
  assert {"/v1/generate", "/v1/embed", "/v1/search", "/healthz"} <= set(json.loads(data)["paths"])
  assert request(f"{server.url}/v1/generate", method="PUT")[0] == 405
  assert request(f"{server.url}/nope")[0] == 404


def test_a_plain_model_lists_no_neighbours_and_refuses_retrieve(server):
  """The export of a model trained without retrieval: candidates have no "neighbours" and
  `retrieve: true` is a 422 naming why (tests/retrieval/test_retriever.py serves
  a retrieval model)."""
  status, data, _ = request(f"{server.url}/v1/generate", {"descriptions": DESCRIPTIONS[0],
                                                          "retrieve": False})
  assert status == 200 and "neighbours" not in json.loads(data)["results"][0]["candidates"][0]
  status, data, _ = request(f"{server.url}/v1/generate", {"descriptions": DESCRIPTIONS[0],
                                                          "retrieve": True})
  assert status == 422 and "trained without retrieval" in json.loads(data)["detail"]
  assert json.loads(request(f"{server.url}/healthz")[1])["retrieves"] is False


def test_a_seeded_sample_gets_the_same_candidates_alone_and_batched(server):
  """Each request's samples are drawn with keys of its own seed and description indices, so
  requests merged into one model call (other seeds, other descriptions) do not change them."""
  rs = random.Random(1)
  bodies = [{"descriptions": rs.sample(DESCRIPTIONS, rs.choice((1, 2))), "strategy": "sample",
             "num_samples": 2, "temperature": 1.5, "top_k": 50, "seed": seed}
            for seed in range(8)]
  alone = [json.loads(request(f"{server.url}/v1/generate", b)[1])["results"] for b in bodies]
  _, before, _ = request(f"{server.url}/metrics")

  def call(i):
    status, data, _ = request(f"{server.url}/v1/generate", bodies[i], timeout=120)
    return i, status, json.loads(data)

  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    answers = list(pool.map(call, [i for i in range(len(bodies)) for _ in range(3)]))
  for i, status, data in answers:
    assert status == 200, data
    for got, want in zip(data["results"], alone[i]):
      assert [c["code"] for c in got["candidates"]] == [c["code"] for c in want["candidates"]]
      np.testing.assert_allclose([c["score"] for c in got["candidates"]],
                                 [c["score"] for c in want["candidates"]], rtol=1e-5)
  _, after, _ = request(f"{server.url}/metrics")
  merged = [_metric(t.decode(), "fac_batch_requests", 'kind="generate"') for t in (before, after)]
  assert merged[1]["count"] - merged[1]["1.0"] > merged[0]["count"] - merged[0]["1.0"], merged


def test_cut_candidates_have_a_score_and_every_candidate_a_finish_reason(server):
  status, data, _ = request(f"{server.url}/v1/generate", {   # num_beams: the README's field
      "descriptions": ["add two numbers", "reverse a string"], "max_new_tokens": 2,
      "strategy": "beam", "num_beams": 2, "num_samples": 2})
  cands = [c for r in json.loads(data)["results"] for c in r["candidates"]]
  assert status == 200 and len(cands) == 4
  assert all(isinstance(c["score"], float) for c in cands)
  assert all(c["finish_reason"] in ("eos", "length") for c in cands)
  assert any(c["finish_reason"] == "length" for c in cands)
  status, data, _ = request(f"{server.url}/v1/generate", {"descriptions": "add two numbers"})
  assert json.loads(data)["results"][0]["candidates"][0]["finish_reason"] in ("eos", "length")


def test_top_k_and_repetition_penalty(server):
  greedy = request(f"{server.url}/v1/generate", {"descriptions": "add two numbers"})[1]
  top1 = request(f"{server.url}/v1/generate", {"descriptions": "add two numbers",
                                              "strategy": "sample", "top_k": 1, "seed": 3})[1]
  assert (json.loads(top1)["results"][0]["candidates"][0]["code"]
          == json.loads(greedy)["results"][0]["candidates"][0]["code"])
  status, data, _ = request(f"{server.url}/v1/generate", {"descriptions": "add two numbers",
                                                          "repetition_penalty": 1.5})
  assert status == 200, data
  # Beam search takes the penalty too (issue 19: greedy, sample and beam, exports included).
  status, data, _ = request(f"{server.url}/v1/generate", {
      "descriptions": "add", "strategy": "beam", "repetition_penalty": 1.5})
  assert status == 200, data


def test_metrics_count_every_refusal_by_status(server):
  url = f"{server.url}/v1/generate"
  sent = {413: request(url, json.dumps({"descriptions": "x " * 3000}).encode())[0],
          415: request(url, b'{"descriptions": "a"}', headers={"Content-Type": "text/plain"})[0],
          400: request(url, b'{"descriptions": ')[0],
          422: request(url, {"descriptions": "a", "seed": -1})[0]}
  assert list(sent) == list(sent.values())
  _, text, _ = request(f"{server.url}/metrics")
  for status in sent:
    assert f'fac_requests_total{{route="/v1/generate",status="{status}"}}' in text.decode()
  assert request(f"{server.url}/nope")[0] == 404
  assert 'route="other",status="404"' in request(f"{server.url}/metrics")[1].decode()


def test_docs_need_no_cdn_and_the_server_says_where_it_listens(server):
  # Swagger UI loads from a CDN, so /docs is off unless --docs asks for it; the schema is local.
  assert request(f"{server.url}/docs")[0] == 404
  assert request(f"{server.url}/openapi.json")[0] == 200
  assert f"on http://127.0.0.1:{server.port}/" in server.output()


def test_schemathesis_finds_no_server_errors(server, tmp_path):
  exe = shutil.which("schemathesis") or os.path.join(os.path.dirname(sys.executable),
                                                     "schemathesis")
  cmd = [exe, "run", f"{server.url}/openapi.json", "--checks", "not_a_server_error",
         "--phases", "examples,fuzzing", "--max-examples", "10", "--seed", "1",
         "--generation-database", "none", "--no-shrink", "--request-timeout", "60",
         "--workers", "2", "--no-color"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=150,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  assert re.search(r"\d+ generated, \d+ passed", proc.stdout), proc.stdout[-2000:]
  assert request(f"{server.url}/healthz")[0] == 200
  assert "Traceback" not in server.output()


# ---------------------------------------------------------------------------------------------
# In process: the batcher's limits with a fake export (no model, no compile).


class SlowExport:
  """The parts of serving.Export the app uses; generate sleeps `delay` seconds."""
  strategies, lengths, batch_buckets, align_dim, step, index = ["greedy"], [8], [1, 4], 2, 0, None
  manifest = {"programs": [], "versions": {}}

  def __init__(self, delay: float):
    self.delay, self.calls = delay, []

  def check_generate(self, descriptions, **_):
    return list(descriptions)

  def retrieves(self, retrieve=None):
    return bool(retrieve)

  def generate(self, texts, **_):
    self.calls.append(list(texts))
    time.sleep(self.delay)
    return [[{"code": f"# {t}\ud800", "score": float("nan"), "align": None, "parses": True,
              "finish_reason": "length"}] for t in texts]


def test_slow_requests_get_408_and_a_full_queue_429():
  from fastapi.testclient import TestClient  # pylint: disable=import-outside-toplevel
  from flax_albert_code.deploy import server as server_lib  # pylint: disable=import-outside-toplevel
  fake = SlowExport(delay=0.3)
  app = server_lib.create_app(fake, server_lib.Limits(request_timeout_s=0.1, max_queue_texts=3,
                                                      max_wait_ms=1))
  with TestClient(app) as client:
    r = client.post("/v1/generate", json={"descriptions": "a"})
    assert r.status_code == 408 and "took over 0.1 s" in r.json()["detail"]
    time.sleep(0.3)
    ok = server_lib.create_app(SlowExport(delay=0.0), server_lib.Limits(max_wait_ms=1))
    with TestClient(ok) as quick:
      r = quick.post("/v1/generate", json={"descriptions": ["a", "b"]})
      assert r.status_code == 200
      cand = r.json()["results"][0]["candidates"][0]
      assert cand["code"] == "# a\ufffd" and cand["score"] is None   # JSON-safe
    codes = []
    threads = [threading.Thread(target=lambda: codes.append(client.post(
        "/v1/generate", json={"descriptions": ["a", "b"]}).status_code)) for _ in range(3)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    assert 429 in codes


def test_batcher_merges_waiting_requests_with_the_same_options():
  from flax_albert_code.deploy import server as server_lib  # pylint: disable=import-outside-toplevel
  seen = []

  def run(key, texts):
    seen.append((key, list(texts)))
    time.sleep(0.05)
    return [f"{key[0]}:{t}" for t in texts]

  async def main():
    b = server_lib.Batcher(run, max_texts=4, max_wait_s=0.05, max_queue=100,
                           observe=lambda *a: None)
    b.start()
    out = await asyncio.gather(*[b.submit((k,), [t]) for k, t in
                                 [("x", "1"), ("y", "2"), ("x", "3"), ("x", "4"), ("x", "5"),
                                  ("x", "6")]])
    await b.stop()
    return out

  out = asyncio.run(main())
  assert out == [["x:1"], ["y:2"], ["x:3"], ["x:4"], ["x:5"], ["x:6"]]
  assert seen[0] == (("x",), ["1", "3", "4"]) and seen[1] == (("y",), ["2"])
  assert sorted(t for _, texts in seen for t in texts) == ["1", "2", "3", "4", "5", "6"]
  assert max(len(texts) for _, texts in seen) <= 4


class BucketedExport(SlowExport):
  """Like an export: a call takes `delay` seconds per batch of 4 (its largest bucket)."""

  def generate(self, texts, **_):
    self.calls.append(list(texts))
    time.sleep(self.delay * -(-len(texts) // self.batch_buckets[-1]))
    return [[{"code": f"# {t}", "score": -1.0, "align": None, "parses": True,
              "finish_reason": "length"}] for t in texts]


def test_a_timed_out_request_is_cancelled_and_does_not_block_later_ones():
  """A request of 80 descriptions needs 20 calls of 4 (0.2 s each, 4 s in all) and times out
  after 1 s; the model stops working for it after the call it is in, so the single requests
  sent after it wait at most for that call, not for the other 3 s of its work."""
  from fastapi.testclient import TestClient  # pylint: disable=import-outside-toplevel
  from flax_albert_code.deploy import server as server_lib  # pylint: disable=import-outside-toplevel
  fake = BucketedExport(delay=0.2)
  app = server_lib.create_app(fake, server_lib.Limits(request_timeout_s=1.0, max_wait_ms=1,
                                                      max_texts=100))
  with TestClient(app) as client:
    big = client.post("/v1/generate", json={"descriptions": [f"d{i}" for i in range(80)]})
    assert big.status_code == 408
    for i in range(3):
      start = time.perf_counter()
      r = client.post("/v1/generate", json={"descriptions": f"after {i}"})
      assert r.status_code == 200, (i, r.json(), time.perf_counter() - start)
      assert r.json()["results"][0]["candidates"][0]["code"] == f"# after {i}"
    time.sleep(0.5)
    ran = [t for call in fake.calls for t in call]
  assert max(len(call) for call in fake.calls) <= 4
  assert sum(t.startswith("d") for t in ran) <= 4 * 7, len(ran)   # ~5 calls of 20


def test_serve_help_and_a_clear_error_without_fastapi(tmp_path):
  """`serve --help` needs no FastAPI; serving without the [serve] extra is one error line."""
  fake = tmp_path / "fastapi"
  fake.mkdir()
  (fake / "__init__.py").write_text("raise ImportError(\"No module named 'fastapi'\")\n")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get(
      "PYTHONPATH", "")]), "JAX_PLATFORMS": "cpu"}
  run = lambda *a: subprocess.run([sys.executable, "-m", "flax_albert_code.serve", *a],
                                  capture_output=True, text=True, env=env, timeout=120,
                                  check=False)
  helped = run("--help")
  assert helped.returncode == 0 and "--export" in helped.stdout and "[serve]" in helped.stdout
  failed = run("--export", str(tmp_path))
  assert failed.returncode == 1 and failed.stdout == ""
  assert failed.stderr.startswith("error: Serving needs the [serve] extra")
  assert len(failed.stderr.splitlines()) == 1


def test_serve_mistakes_are_one_error_line(exported):
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    for args, words in ((["--port", str(port)], f"Cannot listen on 127.0.0.1:{port}"),
                        (["--max-texts", "0"], "--max-texts must be at least 1, got 0."),
                        (["--request-timeout-s", "0"], "--request-timeout-s must be positive")):
      proc = subprocess.run([sys.executable, "-m", "flax_albert_code.serve", "--export", exported,
                             *args], capture_output=True, text=True, timeout=120, check=False,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
      assert proc.returncode == 1 and proc.stderr.startswith(f"error: {words}"), proc.stderr
      assert len(proc.stderr.splitlines()) == 1
