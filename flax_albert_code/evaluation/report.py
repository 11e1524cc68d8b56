"""report.json and report.md from an `evaluate` / `evaluate_humaneval` results dict: one table
(a blank where a metric does not apply), then example outputs of every method side by side."""
from __future__ import annotations

import json
import os
from typing import Any

# (column header, row key, format)
COLUMNS = (("BLEU", "bleu", "{:.2f}"), ("EM %", "exact_match", "{:.2f}"),
           ("parses %", "parse_rate", "{:.1f}"), ("degenerate %", "degenerate_rate", "{:.1f}"),
           ("k", "k", "{}"), ("MRR", "mrr", "{:.3f}"),
           ("R@1 %", "r@1", "{:.1f}"), ("R@5 %", "r@5", "{:.1f}"), ("R@10 %", "r@10", "{:.1f}"),
           ("candidates", "candidates", "{}"), ("pass@1 %", "pass@1", "{:.2f}"),
           ("pass@10 %", "pass@10", "{:.2f}"), ("samples", "samples", "{}"),
           ("examples", "examples", "{}"))


def table(rows: list[dict]) -> str:
  """A markdown table of the columns that some row has."""
  cols = [c for c in COLUMNS if any(c[1] in r for r in rows)]
  lines = ["| method | " + " | ".join(c[0] for c in cols) + " |",
           "|---|" + "---:|" * len(cols)]
  for r in rows:
    cells = [fmt.format(r[key]) if key in r else "" for _, key, fmt in cols]
    lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _fence(code: str) -> str:
  ticks = "```"
  while ticks in code:
    ticks += "`"
  return f"{ticks}python\n{code.rstrip()}\n{ticks}"


def _cases(title: str, cases: list[dict]) -> list[str]:
  out = [f"### {title}", ""]
  for c in cases:
    label = c.get("task_id") or c.get("name") or ""
    out += [f"**{label}** sentence BLEU {c['sentence_bleu']:.1f} ({c['ranked_by']})".strip(), "",
            "> " + c["description"].replace("\n", "\n> "), "",
            "<table><tr><th>reference</th>"
            + "".join(f"<th>{name}</th>" for name in c["outputs"]) + "</tr><tr>", "",
            "<td>", "", _fence(c["reference"]), "", "</td>"]
    for code in c["outputs"].values():
      out += ["<td>", "", _fence(code), "", "</td>"]
    out += ["</tr></table>", ""]
  return out


def markdown(results: dict[str, Any]) -> str:
  task = results.get("task", "generation")
  lines = [f"# Evaluation: {results.get('title', task)}", "",
           f"{results['num_examples']} examples"
           + (f"; BM25 baselines over {results['num_train_examples']} training examples"
              if results.get("num_train_examples") else "") + ".", ""]
  cut = (results.get("truncated") or {}).get("descriptions")
  if cut:
    shown = ", ".join(map(str, cut[:20])) + (", ..." if len(cut) > 20 else "")
    lines += [f"{len(cut)} descriptions were longer than the model reads "
              f"({results['truncated']['max_tokens']} tokens) and were cut: examples {shown} "
              "(numbered from 1; all of them in report.json, `truncated`).", ""]
  if any(r.get("kind") == "retrieval" for r in results["rows"]):
    lines += ["Retrieval follows CodeSearchNet: each query is ranked against its own target and "
              "the other examples of its chunk as distractors; `candidates` is the chunk size "
              "(ties count against the target).", ""]
  if task == "humaneval":
    lines += ["HumanEval: every candidate ran in the sandbox (see `sandbox` in report.json). "
              "Unreranked sampling: unbiased pass@k over all samples; greedy, beam and reranked "
              "lists: one of the first k passes.", ""]
  lines += [table(results["rows"]), ""]
  ex = results.get("examples") or {}
  for key, title in (("best", "Best examples"), ("worst", "Worst examples"),
                     ("random", f"Random examples (random.Random({ex.get('random_seed', 0)}), "
                                "not chosen by score)")):
    if ex.get(key):
      lines += _cases(title, ex[key])
  return "\n".join(lines).rstrip() + "\n"


def keep_earlier(out_dir: str) -> list[str]:
  """Renames an earlier report.json/.md in `out_dir` to report.N.json/.md (the first N free);
  the new paths."""
  def path(name):
    return os.path.join(out_dir, name)
  exts = [ext for ext in ("json", "md") if os.path.isfile(path(f"report.{ext}"))]
  n = 1
  while any(os.path.exists(path(f"report.{n}.{ext}")) for ext in ("json", "md")):
    n += 1
  for ext in exts:
    os.replace(path(f"report.{ext}"), path(f"report.{n}.{ext}"))
  return [path(f"report.{n}.{ext}") for ext in exts]


def write(results: dict[str, Any], out_dir: str) -> tuple[str, str]:
  """Writes report.json and report.md into `out_dir`; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, "report.json")
  md_path = os.path.join(out_dir, "report.md")
  with open(json_path, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2, ensure_ascii=False)
  with open(md_path, "w", encoding="utf-8") as f:
    f.write(markdown(results))
  return json_path, md_path
