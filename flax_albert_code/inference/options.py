"""The decoding options a user sets, checked in one place for the commands, the Python API and
the HTTP server: each option has one range and one message, naming the field (`num_beams`) or,
through `OptionError.for_flags()`, the flag (`--num-beams`). Traced values are left alone.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Sequence

import numpy as np

MAX_SEED = 2**31 - 1
# Ranges of the real-valued options: (low, low inclusive, high, high inclusive).
RANGES = {
    "temperature": (0.0, False, 100.0, True),
    "top_p": (0.0, False, 1.0, True),
    "length_penalty": (0.0, True, 10.0, True),
    "repetition_penalty": (1.0, True, 10.0, True),
}


def flag(field: str) -> str:
  """The command-line flag of a field: num_beams -> --num-beams."""
  return "--" + field.replace("_", "-")


class OptionError(ValueError):
  """An option out of range; str() names fields (num_beams), for_flags() names flags."""

  def __init__(self, render: Callable[[Callable[[str], str]], str]):
    super().__init__(render(lambda f: f))
    self._render = render

  def for_flags(self) -> str:
    return self._render(flag)


def _is_static(x: Any) -> bool:
  return isinstance(x, (numbers.Number, np.generic)) and not isinstance(x, bool)


def check(*, strategies: Sequence[str], strategy: str = "greedy",
          max_new_tokens: int | None = None, num_samples: int = 1, num_beams: int = 4,
          temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, length_penalty: float = 1.0,
          repetition_penalty: float = 1.0, seed: int = 0, max_tokens: int | None = None,
          vocab_size: int | None = None, max_samples: int | None = None, beams_fixed: bool = False,
          max_tokens_why: str = "the model's positions", no_repeat_ngram_size: int = 0) -> None:
  """Raises OptionError (one sentence) for the first option out of range; `max_tokens`,
  `vocab_size` and `max_samples` are limits where known; `beams_fixed`: the export's width."""
  def fail(render):
    raise OptionError(render)

  if strategy not in strategies:
    fail(lambda n: f"Unknown decoding strategy {strategy!r}; use {', '.join(strategies)}.")
  ints = {"num_samples": num_samples, "num_beams": num_beams, "top_k": top_k, "seed": seed,
          "no_repeat_ngram_size": no_repeat_ngram_size, "max_new_tokens": max_new_tokens}
  for name, v in ints.items():
    if isinstance(v, bool) or (_is_static(v) and not isinstance(v, (numbers.Integral))):
      fail(lambda n, name=name, v=v: f"{n(name)} must be a whole number, got {v!r}.")
  for name, v in {"temperature": temperature, "top_p": top_p, "length_penalty": length_penalty,
                  "repetition_penalty": repetition_penalty}.items():
    if isinstance(v, bool) or not (_is_static(v) or hasattr(v, "shape")):
      fail(lambda n, name=name, v=v: f"{n(name)} must be a number, got {v!r}.")
    low, low_in, high, high_in = RANGES[name]
    if _is_static(v) and not (math.isfinite(v) and (v >= low if low_in else v > low)
                              and (v <= high if high_in else v < high)):
      span = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
      what = {"temperature": f"must be positive and at most {high:g}",
              "repetition_penalty": f"must be in {span} (1.0: off)"}.get(name, f"must be in {span}")
      fail(lambda n, name=name, v=v, what=what: f"{n(name)} {what}, got {v:g}.")
  for name, v, most, why in (("max_new_tokens", max_new_tokens, max_tokens, f" ({max_tokens_why})"),
                             ("num_samples", num_samples, max_samples, ""),
                             ("num_beams", num_beams, None, "")):
    if _is_static(v) and v < 1:
      fail(lambda n, name=name, v=v: f"{n(name)} must be at least 1, got {v}.")
    if _is_static(v) and most is not None and v > most:
      fail(lambda n, name=name, v=v, most=most, why=why:
           f"{n(name)} must be at most {most}{why}, got {v}.")
  if _is_static(top_k):
    if top_k < 0:
      fail(lambda n: f"{n('top_k')} must be 0 (off) or positive, got {top_k}.")
    if vocab_size is not None and top_k > vocab_size:
      fail(lambda n: f"{n('top_k')} must be at most the vocabulary size {vocab_size}, got "
                     f"{top_k}.")
  if _is_static(no_repeat_ngram_size) and no_repeat_ngram_size < 0:
    fail(lambda n: f"{n('no_repeat_ngram_size')} must be 0 (off) or positive, got "
                   f"{no_repeat_ngram_size}.")
  if _is_static(seed) and not 0 <= seed <= MAX_SEED:
    fail(lambda n: f"{n('seed')} must be in 0..{MAX_SEED}, got {seed}.")
  if strategy == "greedy" and _is_static(num_samples) and num_samples != 1:
    fail(lambda n: f"Greedy decoding gives one candidate, not "
                   f"{_setting(n, 'num_samples', num_samples)}; "
                   f"use {_setting(n, 'strategy', 'sample')} or beam for several.")
  if strategy == "beam" and _is_static(num_samples) and num_samples > num_beams:
    if beams_fixed:
      fail(lambda n: f"This export's beam search keeps {num_beams} beams, so it cannot return "
                     f"{_setting(n, 'num_samples', num_samples)}.")
    fail(lambda n: f"Beam search keeps {num_beams} beams, so it cannot return "
                   f"{_setting(n, 'num_samples', num_samples)}; raise {n('num_beams')} or lower "
                   f"{n('num_samples')}.")


def _setting(name_of: Callable[[str], str], field: str, value: Any) -> str:
  """`num_samples=3` (Python, JSON) or `--num-samples 3` (command line)."""
  name = name_of(field)
  return f"{name} {value}" if name.startswith("--") else f"{name}={value}"


def candidate_keys(seed: int, indices: Sequence[int], k: int) -> np.ndarray:
  """uint32 [len(indices), k, 2]: fold_in(fold_in(PRNGKey(seed), indices[i]), j)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  base = jax.random.PRNGKey(int(seed))
  fold = jax.vmap(jax.vmap(jax.random.fold_in, (None, 0)), (0, None))
  rows = jax.vmap(jax.random.fold_in, (None, 0))(base, jnp.asarray(list(indices), jnp.uint32))
  return np.asarray(fold(rows, jnp.arange(k, dtype=jnp.uint32)), np.uint32)
