"""flax_albert_code: an ALBERT encoder/decoder in JAX/Flax that learns to write code from descriptions."""
__version__ = "0.1.0"


def __getattr__(name: str):
  # Lazy, so `import flax_albert_code` stays light: serving imports jax.
  if name == "load_export":
    from flax_albert_code.deploy.runtime import load_export  # pylint: disable=import-outside-toplevel
    return load_export
  raise AttributeError(f"module 'flax_albert_code' has no attribute {name!r}")
