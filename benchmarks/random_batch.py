"""Shared set-up of the scoring benchmarks: a random-weight model, split for ``evaluate._score_batch``, and a
random padded ICL prefix."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dualform.models import build_model, get_config
from dualform.static import Hashed, interned


@dataclasses.dataclass
class RandomBatchSetup:
  """config, interned graphdef and state of the model; prefix [1, C] token ids with ``valid`` real ones
  (C - 100, at least 1); ``rng`` for the benchmark's own draws."""

  config: object
  graphdef: Hashed
  state: object
  prefix: jax.Array
  valid: jax.Array
  rng: np.random.Generator


def random_batch_setup(model: str, dtype: str, scan_layers: bool, cache: int, seed: int = 0,
                       prefix_attention: str = "xla") -> RandomBatchSetup:
  config = get_config(model).replace(dtype=dtype, param_dtype=dtype, scan_layers=scan_layers,
                                     prefix_attention=prefix_attention)
  graphdef, state = nnx.split(build_model(config, seed))
  rng = np.random.default_rng(seed)
  prefix = jnp.asarray(rng.integers(4, 1000, (1, cache)), jnp.int32)
  return RandomBatchSetup(config=config, graphdef=interned(graphdef), state=state, prefix=prefix,
                          valid=jnp.asarray(max(1, cache - 100), jnp.int32), rng=rng)
