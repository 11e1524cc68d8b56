"""flax_albert_code: an ALBERT encoder/decoder in JAX/Flax that learns to write code from
descriptions."""
__version__ = "0.1.0"


def __getattr__(name: str):
  # Lazy (PEP 562), so that `import flax_albert_code` (and so every command's `--help` and
  # `flax_albert_code.config`) does not import jax, as deploy/runtime.py does.
  if name == "load_export":
    from flax_albert_code.deploy.runtime import load_export  # pylint: disable=import-outside-toplevel
    return load_export
  raise AttributeError(f"module 'flax_albert_code' has no attribute {name!r}")
