"""Writes the "Multi-GPU scaling" section of benchmarks/RESULTS.md from bench_scaling.py's JSON.

  python benchmarks/write_scaling.py scaling.json --gpu "NVIDIA H100 80GB HBM3" \
      --out benchmarks/RESULTS.md      (run_scaling.sh calls it; without --out: print only)

Works on partial results (a run killed by its time limit): what is missing is said so.
"""
from __future__ import annotations

import argparse
import json

from bench_serving import replace_section   # this directory

HEADER = "## Multi-GPU scaling (issue 10)"
WORKLOAD = {"bench-a": "BENCH-A: configs/base.py,", "tiny": "the tiny workload:"}
NAMES = {"single": "one device", "data": "data={n}", "fsdp": "fsdp={n}", "tensor": "tensor={n}",
         "data_scaled": "data={n}"}


def _mib(b) -> str:
  return f"{b / 2**20:,.1f} MiB" if isinstance(b, (int, float)) else "n/a"


def _gib(b) -> str:
  if not isinstance(b, (int, float)):
    return "n/a"
  return f"{b / 2**30:,.2f} GiB" if b >= 2**30 else _mib(b)


def _label(name: str, r: dict, n) -> str:
  label = NAMES[name].format(n=n)
  return label + " (XLA attention: cuDNN's failed)" if r.get("cudnn_error") else label


def _error(r) -> str:
  return f"failed: `{r['error'][:200]}`" if isinstance(r, dict) and "error" in r else "not run"


def losses_section(res, runs, n) -> list[str]:
  cmp = res.get("losses") or {}
  k = res.get("shapes", {}).get("loss_steps", "K")
  rtol = cmp.get("rtol")
  lines = [
      "### The same training on every mesh",
      "",
      f"The first {k} steps, same seed and batches, global batch "
      f"{res.get('shapes', {}).get('batch_per_device', '?')}: the largest difference to one "
      f"device over the {k} steps. Tolerance: relative {rtol} on loss, gen_loss and infonce_loss "
      f"({res.get('model', {}).get('dtype')} compute; bench_scaling.py's RTOL says why).",
      "",
      "| mesh | loss, step 1 -> last | loss max abs | loss max rel | gen_loss max rel | "
      "infonce max rel | grad_norm max rel | within tolerance |",
      "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
  ]
  for name in ("single", "data", "fsdp", "tensor"):
    r = runs.get(name, {})
    label = _label(name, r, n)
    if not r.get("history"):
      lines.append(f"| {label} | {_error(r)} | | | | | | |")
      continue
    h = r["history"]
    first = f"{h[0]['loss']:.4f} -> {h[-1]['loss']:.4f}"
    if name == "single":
      lines.append(f"| {label} | {first} | | | | | | reference |")
      continue
    d = cmp.get(name, {})
    rel = lambda key: f"{d[key]['max_rel']:.1e}" if key in d else "n/a"
    ok = "yes" if d.get("ok") else ("**no**" if d else "n/a")
    lines.append(f"| {label} | {first} | {d.get('loss', {}).get('max_abs', float('nan')):.1e} | "
                 f"{rel('loss')} | {rel('gen_loss')} | {rel('infonce_loss')} | {rel('grad_norm')} "
                 f"| {ok} |")
  return lines


def throughput_section(res, runs, n) -> list[str]:
  one = runs.get("single", {}).get("tokens_per_s")
  lines = [
      "### Throughput",
      "",
      "Tokens/s (description + code) of a pipelined run of steps after the warm-up. Data "
      f"parallel at a fixed per-device batch (one device: {res['shapes']['batch_per_device']}; "
      f"{n} devices: {n} x {res['shapes']['batch_per_device']}) gives the scaling efficiency "
      "tokens/s(N) / (N x tokens/s(1)), target >= 90%; the other rows run the global batch of "
      "one device, what FSDP and tensor parallelism cost against data parallelism.",
      "",
      "| mesh | global batch | per device | step | tokens/s | vs N x one device | compile |",
      "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for name in ("single", "data_scaled", "data", "fsdp", "tensor"):
    r = runs.get(name, {})
    label = _label(name, r, n)
    if "tokens_per_s" not in r:
      lines.append(f"| {label} | | | {_error(r)} | | | |")
      continue
    devices = r["devices"]
    vs = f"{r['tokens_per_s'] / (devices * one):.1%}" if one else "n/a"
    if name == "data_scaled":
      vs = f"**{vs}** (scaling efficiency)"
    lines.append(f"| {label} | {r['batch']} | {r['per_device_batch']} | {r['step_ms']:.1f} ms | "
                 f"{r['tokens_per_s']:,.0f} | {vs} | {r['compile_s']:.0f} s |")
  t = res.get("throughput") or {}
  if "efficiency" in t:
    met = "met" if t["efficiency"] >= 0.9 else "**not met**"
    lines += ["", f"Data parallel scaling efficiency on {n} devices: {t['efficiency']:.1%} "
              f"(target >= 90%: {met})."]
  return lines


def memory_section(res, runs, n) -> list[str]:
  lines = [
      "### Memory of device 0",
      "",
      "Parameters and optimizer state: the bytes of their shards on device 0 (fp32 master weights "
      "and AdamW moments). XLA's estimate: the compiled step's arguments + outputs - donated + "
      "temporaries on one device. Peak: the allocator's peak so far, process-wide; the runs go "
      "in the order of the rows, FSDP first, so its peak is its own.",
      "",
      "| mesh | global batch | params | optimizer state | params + optimizer | XLA's estimate "
      "of the step | peak so far |",
      "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for name in ("fsdp", "data", "tensor", "single", "data_scaled"):
    r = runs.get(name, {})
    if "params_bytes" not in r:
      continue
    xla = (r.get("xla_memory") or {}).get("total")
    peak = (r.get("after_steps") or {}).get("peak_bytes_in_use")
    lines.append(f"| {_label(name, r, n)} | {r['batch']} | {_mib(r['params_bytes'])} | "
                 f"{_mib(r['opt_bytes'])} | {_mib(r['params_bytes'] + r['opt_bytes'])} | "
                 f"{_gib(xla)} | {_gib(peak)} |")
  f, d = runs.get("fsdp", {}), runs.get("data", {})
  if "params_bytes" in f and "params_bytes" in d:
    ratio = (f["params_bytes"] + f["opt_bytes"]) / (d["params_bytes"] + d["opt_bytes"])
    lines += ["", f"FSDP keeps {ratio:.3f} of data parallel's parameters and optimizer state on "
              f"each device (1/{n} = {1 / n:.3f})."]
  return lines


def checkpoint_section(res, n) -> list[str]:
  c = res.get("checkpoint")
  lines = [f"### A checkpoint saved on {n} devices (fsdp={n}) restores on one", ""]
  if not isinstance(c, dict) or "error" in c:
    return lines + [_error(c) if c else "Not run."]
  saved = c.get("saved") or {}
  lines.append(f"Saved by `checkpoint.Checkpointer` as training/loop.py saves (step "
               f"{saved.get('step')}, {saved.get('arrays')} arrays, each over "
               f"{saved.get('devices_per_array')} devices).")
  for key, what in (("subprocess", "a fresh process that sees one device"),
                    ("in_process", "a one-device mesh in the same process")):
    r = c.get(key, {})
    if "error" in r:
      lines.append(f"- {what}: {_error(r)}")
    else:
      lines.append(f"- {what} (visible devices: {r.get('visible_devices')}): every array bitwise "
                   f"equal to the saved one (sha256 of {r['arrays']} arrays): "
                   f"**{'yes' if r.get('bitwise_equal') else 'no'}**"
                   + (f"; differing: {r['mismatched']}" if r.get("mismatched") else ""))
  return lines


def large_section(res, n) -> list[str]:
  g = res.get("large")
  lines = ["### ALBERT-large sizes with FSDP at a batch that does not fit one device", ""]
  if not isinstance(g, dict) or "error" in g:
    skipped = res.get("skipped", {}).get("large")
    return lines + [f"Skipped: {skipped}." if skipped else _error(g)]
  m = g.get("model", {})
  lines += [f"Preset {m.get('preset')}, {m.get('dtype')}, {m.get('attention_impl')} attention, "
            f"remat {m.get('remat')}, scan over depth {m.get('scan_layers')}; the full step. Train "
            "state per device (from shapes): " + ", ".join(
                f"{NAMES[k].format(n=n)} {_mib(v)}"
                for k, v in g.get("state_bytes_per_device", {}).items()) + ".", "",
            "| batch on one device | fits? | tokens/s | step | peak |",
            "| ---: | --- | ---: | ---: | ---: |"]
  for b, r in g.get("ladder", {}).items():
    if r.get("ok"):
      lines.append(f"| {b} | yes | {r['tokens_per_s']:,.0f} | {r['step_ms']:.0f} ms | "
                   f"{_gib(r.get('peak'))} |")
    else:
      lines.append(f"| {b} | {'out of memory' if r.get('oom') else 'failed'} | | | |")
  if g.get("stopped"):
    lines += ["", f"Ladder stopped: {g['stopped']}."]
  f = g.get("fsdp")
  if isinstance(f, dict) and "tokens_per_s" in f:
    beyond = ("a batch that ran out of memory on one device"
              if g.get("fsdp_batch_exceeds_one_device")
              else "twice the largest batch tried on one device (none ran out of memory)")
    lines += ["", f"{_label('fsdp', f, n)} at batch {f['batch']} ({beyond}): "
              f"{f['tokens_per_s']:,.0f} tokens/s, "
              f"step {f['step_ms']:.0f} ms, peak of device 0 "
              f"{_gib((f.get('after_steps') or {}).get('peak_bytes_in_use'))}, XLA's estimate "
              f"{_gib((f.get('xla_memory') or {}).get('total'))}."]
  elif f:
    lines += ["", f"fsdp={n} run: {f.get('skipped') or _error(f)}."]
  return lines


def markdown(res: dict, gpu: str = "") -> str:
  n = res.get("devices", "N")
  v = res.get("versions", {})
  runs = res.get("runs", {})
  m = res.get("model", {})
  lines = [
      HEADER,
      "",
      f"One run of `bash benchmarks/run_scaling.sh` ({res.get('workload')}) on {n} x "
      f"{gpu or v.get('device')}, {v.get('date')}; jax {v.get('jax')}, flax {v.get('flax')}, "
      f"optax {v.get('optax')}; {res.get('wall_s', 0):.0f} s in all. The full training step "
      f"(generation + InfoNCE) of {WORKLOAD.get(res.get('workload'), 'the')} preset "
      f"{m.get('preset')} ({m.get('dtype')}, {m.get('attention_impl')} attention, scan over "
      f"depth {m.get('scan_layers')}), descriptions "
      f"{res.get('shapes', {}).get('desc')} + code {res.get('shapes', {}).get('code')} tokens, "
      f"random tokens. Meshes over (data, fsdp, tensor): `data={n}` replicates the state, "
      f"`fsdp={n}` shards parameters and optimizer state (ZeRO-3 style), `tensor={n}` shards "
      "heads, FFN and vocabulary (Megatron style). Raw numbers: `scaling.json`.",
      "",
      *losses_section(res, runs, n), "",
      *throughput_section(res, runs, n), "",
      *memory_section(res, runs, n), "",
      *checkpoint_section(res, n), "",
      *large_section(res, n),
  ]
  if res.get("skipped"):
    lines += ["", "Skipped for time: "
              + "; ".join(f"{k} ({why})" for k, why in res["skipped"].items()) + "."]
  if "wall_s" not in res:
    lines += ["", "**The run did not finish** (killed by its time limit): the parts above that "
              "say 'not run' had not started."]
  return "\n".join(lines) + "\n"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("json", help="bench_scaling.py --out")
  ap.add_argument("--gpu", default="", help="the GPU's name for the text")
  ap.add_argument("--out", default=None, help="RESULTS.md to update (else print only)")
  a = ap.parse_args()
  with open(a.json) as f:
    text = markdown(json.load(f), a.gpu)
  if a.out:
    replace_section(a.out, HEADER, text)
  print(text)


if __name__ == "__main__":
  main()
