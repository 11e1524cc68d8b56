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


# Longer than the tiny model reads (22 tokens): examples 5 and 8 once these are inserted.
LONG = [" ".join(["reverse the words of the string and then count how many there are"] * 3),
        " ".join(["merge every dictionary of the list into one dictionary"] * 3)]


def test_evaluate_cli_writes_reports_with_every_method(workdir, tmp_path, capsys):
  """Descriptions the model cuts are one warning (not one per description, batch and method)
  and their numbers, counted over the whole split, go to the report; progress is a line now and
  then on a stderr that is not a terminal; a second run keeps the first one's report."""
  descriptions = DESCRIPTIONS[:4] + LONG[:1] + DESCRIPTIONS[4:] + LONG[1:]
  data = tmp_path / "pairs.jsonl"
  data.write_text("".join(json.dumps({"description": d, "code": c}) + "\n"
                          for d, c in zip(descriptions, CODES + CODES)))
  out = tmp_path / "report"
  evaluate.main(["--checkpoint", workdir, "--data", f"jsonl:{data}", "--strategies",
                 "greedy,beam", "--rerank", "--num-beams", "2", "--no-baselines",
                 "--batch-size", "3", "--out", str(out)])
  report = json.loads((out / "report.json").read_text())
  methods = [r["method"] for r in report["rows"]]
  assert methods[:3] == ["greedy", "beam", "beam + align rerank"], methods
  assert any(m.startswith("alignment desc") for m in methods)
  greedy = report["rows"][0]
  assert greedy["examples"] == len(descriptions) and 0.0 <= greedy["bleu"] <= 100.0
  md = (out / "report.md").read_text()
  assert "| greedy |" in md and os.path.getsize(out / "report.md") > 200
  assert report["truncated"] == {"descriptions": [5, 8], "max_tokens": 22}
  assert "2 descriptions were longer than the model reads (22 tokens) and were cut: examples " \
         "5, 8" in md
  err = capsys.readouterr().err
  assert [line for line in err.splitlines() if "longer than the model reads" in line] == [
      "warning: 2 of 8 descriptions are longer than the model reads (22 tokens) and were cut; "
      "report.json lists them (truncated)."], err
  assert "\r" not in err and "greedy: 8/8 desc (100%), " in err and "beam: 0/8 desc" in err

  evaluate.main(["--checkpoint", workdir, "--data", f"jsonl:{data}", "--no-baselines",
                 "--no-retrieval", "--out", str(out)])
  assert json.loads((out / "report.1.json").read_text()) == report
  assert (out / "report.1.md").read_text() == md
  assert "(the earlier report kept as report.1.json and report.1.md)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["--strategies", "nucleus"], "error: Unknown decoding strategy 'nucleus'"),
    (["--num-beams", "0", "--strategies", "beam"], "error: --num-beams must be at least 1, got 0."),
    (["--max-examples", "-1"], "error: --max-examples must be at least 0 (0: all), got -1."),
    (["--out", "FILE"], "is a file; the report (report.json, report.md) needs a directory."),
    (["--split", "bogus"], "error: Unknown split 'bogus'"),
    (["--seed", "-1"], "error: --seed must be in 0..2147483647, got -1."),
])
def test_evaluate_mistakes_are_one_line_before_any_work(workdir, tmp_path, capsys, monkeypatch,
                                                        argv, words):
  from flax_albert_code.inference import generator  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(generator.CodeGenerator, "from_checkpoint",
                      lambda *a, **k: pytest.fail("loaded the model before checking the flags"))
  (tmp_path / "FILE").write_text("")
  argv = [str(tmp_path / "FILE") if a == "FILE" else a for a in argv]
  assert evaluate.main(["--checkpoint", workdir, *argv]) == 1
  captured = capsys.readouterr()
  assert words in captured.err and len(captured.err.splitlines()) == 1, captured.err
  assert captured.err.startswith("error: ") and "Traceback" not in captured.err


def test_evaluate_missing_checkpoint_is_one_line(tmp_path, capsys):
  assert evaluate.main(["--checkpoint", str(tmp_path / "nope")]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: Checkpoint path") and "does not exist" in err
  assert len(err.splitlines()) == 1
