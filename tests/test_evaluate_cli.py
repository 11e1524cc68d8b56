"""`python -m flax_albert_code.evaluate` end to end on a tiny checkpoint (the shared one of the
export tests) and a jsonl source: reports are written and hold every asked-for row. The
notebook test (tests/test_launch.py) also evaluates a checkpoint trained on the stdlib."""
from __future__ import annotations

import json
import os

import pytest

from export_util import CODES, DESCRIPTIONS, shared_export
from flax_albert_code import evaluate


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return shared_export(tmp_path_factory)[0]


def test_evaluate_cli_writes_reports_with_every_method(workdir, tmp_path):
  data = tmp_path / "pairs.jsonl"
  data.write_text("".join(json.dumps({"description": d, "code": c}) + "\n"
                          for d, c in zip(DESCRIPTIONS, CODES)))
  out = tmp_path / "report"
  evaluate.main(["--checkpoint", workdir, "--data", f"jsonl:{data}", "--strategies",
                 "greedy,beam", "--rerank", "--num-beams", "2", "--no-baselines",
                 "--out", str(out)])
  report = json.loads((out / "report.json").read_text())
  methods = [r["method"] for r in report["rows"]]
  assert methods[:3] == ["greedy", "beam", "beam + align rerank"], methods
  assert any(m.startswith("alignment desc") for m in methods)
  greedy = report["rows"][0]
  assert greedy["examples"] == len(DESCRIPTIONS) and 0.0 <= greedy["bleu"] <= 100.0
  assert "| greedy |" in (out / "report.md").read_text()
  assert os.path.getsize(out / "report.md") > 200
