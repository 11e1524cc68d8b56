"""The HTTP server's limits, apart from the server so that `serve --help` needs no FastAPI."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Limits:
  max_body_bytes: int = 256 * 1024
  max_texts: int = 32              # descriptions (or texts, or queries) per request
  max_text_chars: int = 4000       # one description or query
  max_code_chars: int = 20000      # one code text to embed
  max_samples: int = 8
  max_top_k: int = 100
  request_timeout_s: float = 60.0
  max_queue_texts: int = 4096      # texts waiting for the model; more is refused with 429
  max_wait_ms: float = 10.0
