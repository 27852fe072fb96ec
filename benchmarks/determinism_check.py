r"""Whether the example-level sums of the device metrics repeat bit for bit (GPU).

Sums softmax weights [100, 32, 1900] into 25 demonstrations five times with ``jax.ops.segment_sum`` (a
scatter-add, whose accumulation order a GPU does not fix) and five times with
``metrics_device.example_level`` (a product with the one-hot segment matrix), and prints whether each
repeats exactly and how far the two differ.

Command: ``python -m benchmarks.determinism_check`` (on the H200: segment_sum False, one-hot product True).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app

from dualform import metrics_device


def main(argv):
  del argv
  weights = jax.nn.softmax(jnp.asarray(np.random.default_rng(0).normal(size=(100, 32, 1900)), jnp.float32), axis=-1)
  lengths = np.full(25, 76)
  segments = jnp.asarray(np.repeat(np.arange(25), lengths))
  scatter = jax.jit(lambda w: jnp.moveaxis(jax.ops.segment_sum(jnp.moveaxis(w, -1, 0), segments, num_segments=25), 0, -1))
  by_scatter = [np.asarray(scatter(weights)) for _ in range(5)]
  by_product = [np.asarray(metrics_device.example_level(weights, lengths)) for _ in range(5)]
  print(f"device {jax.devices()[0].device_kind}: segment_sum repeats bitwise: "
        f"{all(np.array_equal(by_scatter[0], x) for x in by_scatter[1:])}; one-hot product repeats bitwise: "
        f"{all(np.array_equal(by_product[0], x) for x in by_product[1:])}; max difference "
        f"{float(np.abs(by_scatter[0] - by_product[0]).max()):.1e}")


if __name__ == "__main__":
  app.run(main)
