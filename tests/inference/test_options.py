"""One validation layer for decoding options (inference/options.py): the same ranges and the
same sentence from the generate and evaluate commands (naming the flag), CodeGenerator, an
export's runtime and the HTTP server (naming the field), on the tiny checkpoint and its export."""
from __future__ import annotations

import json

import pytest

from export_util import shared_export
from flax_albert_code import evaluate, generate
from flax_albert_code.inference import options

STRATEGIES = ("greedy", "sample", "beam")
# (field, value, the sentence, naming the field as Python and JSON do)
BAD = [
    ("strategy", "nucleus", "Unknown decoding strategy 'nucleus'; use greedy, sample, beam."),
    ("num_samples", 0, "num_samples must be at least 1, got 0."),
    ("temperature", 0.0, "temperature must be positive and at most 100, got 0."),
    ("top_k", -1, "top_k must be 0 (off) or positive, got -1."),
    ("top_p", 1.5, "top_p must be in (0, 1], got 1.5."),
    ("length_penalty", -1.0, "length_penalty must be in [0, 10], got -1."),
    ("repetition_penalty", 0.5, "repetition_penalty must be in [1, 10] (1.0: off), got 0.5."),
    ("seed", -1, f"seed must be in 0..{options.MAX_SEED}, got -1."),
    ("max_new_tokens", 0, "max_new_tokens must be at least 1, got 0."),
]


def _flagged(message: str, field: str) -> str:
  return message.replace(field, options.flag(field), 1) if field != "strategy" else message


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return shared_export(tmp_path_factory)


@pytest.fixture(scope="module")
def surfaces(run):
  """field message -> what each surface said, for every BAD option."""
  from fastapi.testclient import TestClient  # pylint: disable=import-outside-toplevel
  from flax_albert_code.deploy import runtime, server  # pylint: disable=import-outside-toplevel
  from flax_albert_code.inference.generator import CodeGenerator  # pylint: disable=import-outside-toplevel
  gen, exp = CodeGenerator.from_checkpoint(run[0]), runtime.load_export(run[1])
  said = {}
  with TestClient(server.create_app(exp)) as client:
    for field, value, _ in BAD:
      out = {}
      for name, fn in (("CodeGenerator", gen.generate), ("load_export", exp.generate)):
        with pytest.raises(ValueError) as info:
          fn(["add two numbers"], **{field: value})
        out[name] = str(info.value)
      r = client.post("/v1/generate", json={"descriptions": "add two numbers", field: value})
      assert r.status_code == 422
      out["server"] = r.json()["detail"]
      said[field] = out
  return said


@pytest.mark.parametrize("field, value, message", BAD, ids=[b[0] for b in BAD])
def test_the_python_api_and_the_server_say_the_same_sentence(surfaces, field, value, message):
  assert surfaces[field] == {"CodeGenerator": message, "load_export": message, "server": message}


@pytest.mark.parametrize("field, value, message", BAD, ids=[b[0] for b in BAD])
def test_the_commands_say_it_naming_the_flag_before_loading_anything(run, capsys, field, value,
                                                                     message):
  flag = ["--" + field.replace("_", "-"), str(value)]
  # A checkpoint that does not exist: the options are refused before it is looked for.
  assert generate.main(["--checkpoint", "/nonexistent", *flag, "add two numbers"]) == 1
  err = capsys.readouterr().err
  assert err == f"error: {_flagged(message, field)}\n"
  if field == "length_penalty":                   # evaluate has no --length-penalty
    return
  if field == "strategy":                         # evaluate's --strategies is a list
    flag = ["--strategies", str(value)]
  assert evaluate.main(["--checkpoint", "/nonexistent", *flag]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
  assert err == f"error: {_flagged(message, field)}\n" or field == "strategy", err


def test_limits_of_the_model_and_the_export_are_named(run):
  from flax_albert_code.deploy import runtime  # pylint: disable=import-outside-toplevel
  exp = runtime.load_export(run[1])
  with pytest.raises(options.OptionError,
                     match=r"max_new_tokens must be at most 12 \(this export's longest "
                           r"program\), got 13\.") as info:
    exp.generate(["add"], max_new_tokens=13)
  assert info.value.for_flags().startswith("--max-new-tokens must be at most 12")
  with pytest.raises(options.OptionError, match="cannot return num_samples=3"):
    exp.generate(["add"], strategy="beam", num_samples=3)
  with pytest.raises(options.OptionError, match="top_k must be at most the vocabulary size"):
    exp.generate(["add"], strategy="sample", top_k=10**6)


def test_check_accepts_the_edges_and_refuses_wrong_types():
  ok = dict(strategies=STRATEGIES, strategy="sample", num_samples=2, temperature=100,
            top_k=0, top_p=1.0, length_penalty=0.0, repetition_penalty=10.0, seed=0,
            max_new_tokens=1)
  options.check(**ok)
  options.check(**{**ok, "seed": options.MAX_SEED, "length_penalty": 10})
  for field, value, words in (("num_samples", 2.5, "num_samples must be a whole number"),
                              ("top_k", True, "top_k must be a whole number"),
                              ("temperature", "hot", "temperature must be a number"),
                              ("temperature", float("nan"), "temperature must be positive"),
                              ("top_p", float("inf"), "top_p must be in")):
    with pytest.raises(options.OptionError, match=words):
      options.check(**{**ok, field: value})
  with pytest.raises(options.OptionError) as info:
    options.check(strategies=STRATEGIES, strategy="greedy", num_samples=2)
  assert str(info.value) == ("Greedy decoding gives one candidate, not num_samples=2; use "
                             "strategy=sample or beam for several.")
  assert info.value.for_flags() == ("Greedy decoding gives one candidate, not --num-samples 2; "
                                    "use --strategy sample or beam for several.")


def test_candidate_keys_depend_on_seed_index_and_candidate_only():
  a = options.candidate_keys(5, [0, 1, 2], 3)
  assert a.shape == (3, 3, 2) and a.dtype.name == "uint32"
  assert (options.candidate_keys(5, [2], 3)[0] == a[2]).all()
  assert len({tuple(k) for k in a.reshape(-1, 2).tolist()}) == 9
  assert not (options.candidate_keys(6, [0], 3)[0] == a[0]).all()
  json.dumps(a.tolist())
