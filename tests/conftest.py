"""Test setup: 8 fake CPU devices so sharding code runs in every CI run (flax's
run_all_tests.sh)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


import logging

import pytest


@pytest.fixture(autouse=True)
def _restore_package_logger():
  """CLI mains called in-process (generate, search) quiet our logger for their terminal; undo it
  so later tests in the same worker still see its records (caplog)."""
  logger = logging.getLogger("flax_albert_code")
  handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
  yield
  logger.handlers[:] = handlers
  logger.propagate, logger.level = propagate, level
