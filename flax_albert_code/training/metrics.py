"""Metric writers (metrics.jsonl + TensorBoard), model FLOPs by formula, MFU.

XLA's cost analysis counts a scan/fori_loop body once, so it undercounts a shared-block model
by its depth; FLOPs here are counted from the config and the batch shapes instead.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any, Mapping

import jax
from etils import epath

# Dense bf16 peak per chip, for MFU. H100/H200: the measured bf16 matmul ceiling on our
# machines (../shared/BENCH.md), not the datasheet; TPUs: datasheet.
PEAK_TFLOPS = {"H100": 766.0, "H200": 790.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
               "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0}


def peak_flops_per_device(device=None) -> float | None:
  kind = (device or jax.devices()[0]).device_kind
  for name, tflops in PEAK_TFLOPS.items():
    if name.lower() in kind.lower():
      return tflops * 1e12
  return None


def _encoder_flops(mc, length: int) -> float:
  h, i, e = mc.hidden_size, mc.intermediate_size, mc.embedding_size
  layers = mc.num_hidden_layers * mc.inner_group_num
  per_token = 2 * e * h + layers * (8 * h * h + 4 * h * i + 4 * length * h)
  return length * per_token + 2 * h * h + 2 * h * mc.align_dim


def _decoder_flops(mc, desc_len: int, code_len: int) -> float:
  h, i, e, v = mc.hidden_size, mc.intermediate_size, mc.embedding_size, mc.vocab_size
  mem = 1 if mc.decoder_memory == "vector" else desc_len
  per_layer = 8 * h * h + 4 * h * h + 4 * h * i + 4 * code_len * h + 4 * mem * h
  per_token = 2 * e * h + mc.decoder_layers * per_layer + 2 * h * e + 2 * e * v
  flops = code_len * per_token + mem * 4 * h * h   # cross K/V projected once (shared block)
  if getattr(mc, "copy_head", False):   # keys (state, token, previous token), query, scores
    flops += mem * (2 * h * h + 4 * e * h) + code_len * (2 * h * h + 2 * e * h + 2 * mem * h)
  return flops


def train_flops_per_example(mc, desc_len: int, code_len: int, *, generation: bool = True,
                            align: bool = True) -> float:
  """Model FLOPs of one training example (3x forward); attention scores counted in full."""
  fwd = _encoder_flops(mc, desc_len)
  if generation:
    fwd += _decoder_flops(mc, desc_len, code_len)
  if align:
    fwd += _encoder_flops(mc, code_len)
  return 3.0 * fwd


def batch_flops(mc, batch: Mapping[str, Any], *, generation: bool = True,
                align: bool = True) -> float:
  """Model FLOPs of one training step on `batch`'s shapes."""
  b, ld = batch["desc_ids"].shape
  lc = batch["code_ids"].shape[1]
  if generation and "ctx_ids" in batch:
    lx = batch["ctx_ids"].shape[1]
    encoder = train_flops_per_example(mc, ld, 0, generation=False, align=False)
    return b * (train_flops_per_example(mc, lx, lc, align=align) + encoder)
  return b * train_flops_per_example(mc, ld, lc, generation=generation, align=align)


class Writer:
  """Scalars to `<workdir>/metrics.jsonl` and TensorBoard; only process 0 writes. On a `gs://`
  workdir metrics.jsonl is rewritten whole on each write (no appends there)."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.tb = None
    if not self.active:
      return
    root = epath.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    self.path = root / "metrics.jsonl"
    self.remote = "://" in str(workdir)
    if self.remote:
      self.text = self.path.read_text() if self.path.exists() else ""
    else:
      self.jsonl = open(self.path, "a", buffering=1)
    if tensorboard:
      try:  # tensorboardX is optional here: without it only metrics.jsonl is written
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self.tb = SummaryWriter(str(root / "tensorboard"))
      except ImportError:
        self.tb = None

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.active:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    line = json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n"
    if self.remote:
      self.text += line
      self.path.write_text(self.text)
    else:
      self.jsonl.write(line)
    if self.tb is not None:
      for k, v in clean.items():
        if math.isfinite(v):
          self.tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self.active:
      if not self.remote:
        self.jsonl.close()
      if self.tb is not None:
        self.tb.close()
