"""Shared numerics for the identity tests: the two precisions and their tolerances, and relative error."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np


@contextlib.contextmanager
def precision(name):
  """Yields (dtype, relative tolerance) with x64 or matmul precision "highest" switched on."""
  if name == "float64":
    with jax.enable_x64(True):
      yield jnp.float64, 1e-10
  else:
    with jax.default_matmul_precision("highest"):
      yield jnp.float32, 1e-5


def relative_error(actual, expected):
  """max |actual - expected| / max |expected|, in float64."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-300))
