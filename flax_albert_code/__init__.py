"""flax_albert_code: an ALBERT encoder/decoder in JAX/Flax that learns to write code from descriptions."""
__version__ = "0.1.0"
