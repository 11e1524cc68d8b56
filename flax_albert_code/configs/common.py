"""What the shipped configs share: `parse_arg` for a file's variants, and blocks of settings.

A config file takes one string argument after a colon (big_vision's `configs/common.py`):

  --config configs/albert.py:large              # the first option's value
  --config configs/albert.py:size=large         # the same, by name
"""
from __future__ import annotations

import ml_collections


def _convert(name: str, text: str, default):
  """`text` as the type of `default`; a ValueError naming the option when it is not one."""
  if isinstance(default, bool):
    lowered = text.lower()
    if lowered in ("true", "1", "yes", ""):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ValueError(f"config argument {name}={text!r} is not a bool; use true or false.")
  try:
    return type(default)(text)
  except ValueError:
    raise ValueError(f"config argument {name}={text!r} is not a valid {type(default).__name__} "
                     f"(its default is {default!r}).") from None


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
  """`arg` ("name=value,..."; a bare word is the first option's value, or True for a bool option
  of that name) as options of `spec` (name -> default, whose type converts the text)."""
  values, given = dict(spec), set()
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    name, eq, text = item.partition("=")
    if not eq:
      if isinstance(spec.get(item), bool):
        name, text = item, "true"
      elif spec:
        name, text = next(iter(spec)), item
    if name not in spec:
      raise ValueError(f"config argument {name!r} is not an option of this config; its options "
                       f"are {', '.join(spec) or 'none'}.")
    if name in given:
      raise ValueError(f"config argument {name!r} is given twice in {arg!r}; give it once.")
    given.add(name)
    values[name] = _convert(name, text, spec[name])
  return ml_collections.ConfigDict(values)


def accelerator(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """GPU and TPU runs: bfloat16 compute (parameters stay float32) and cuDNN's fused attention."""
  c.model.dtype = "bfloat16"
  c.model.attention_impl = "cudnn"
  return c
