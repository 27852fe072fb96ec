"""Tests of dualform.sharding.

Rule resolution and mesh-spec errors run in-process on abstract meshes. The multi-device equivalence runs in
a subprocess that sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before importing jax (this
process, like every pytest-xdist worker, has already initialised jax with one CPU device): logits, every
recorded quantity and a cached continuation batch on data=8, data=2 x model=4 and model=8 meshes equal the
single-device run (float32, HIGHEST matmuls, relative error ``max|a - b| / max|b|`` <= 1e-5).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from dualform import sharding
from dualform.models import abstract_model, get_config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MESHES = {"data8": {"data": 8}, "data2_model4": {"data": 2, "model": 4}, "model8": {"model": 8}}
FAMILIES = ("llama", "fairseq_dense")
TOLERANCE = 1e-5

WORKER = textwrap.dedent(r'''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from dualform import sharding
    from dualform.models import RECORD_ALL, build_model, tiny_config

    assert jax.device_count() == 8, jax.devices()
    MESHES = json.loads(sys.argv[1])
    CONFIGS = {
        # 6 query / 3 key-value heads and a vocabulary of 100: some dims do not divide 8 (replicated there).
        "llama": tiny_config("llama", num_heads=6, num_kv_heads=3, head_dim=8, embed_dim=48, mlp_dim=96,
                             vocab_size=100),
        "fairseq_dense": tiny_config("fairseq_dense"),
    }

    def relative_error(actual, expected):
      actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
      assert actual.shape == expected.shape, (actual.shape, expected.shape)
      return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))

    def run(model, tokens, record_positions, context, continuations, continuation_positions):
      graphdef, state = nnx.split(model)

      @jax.jit
      def full(state, tokens, record_positions):
        out = nnx.merge(graphdef, state).forward(tokens, record=RECORD_ALL, record_positions=record_positions)
        return out.logits, out.records

      @jax.jit
      def encode(state, context):
        return nnx.merge(graphdef, state).encode_prefix(context)

      @jax.jit
      def cached(state, continuations, cache, record_positions):
        out = nnx.merge(graphdef, state).forward(continuations, cache=cache, record=RECORD_ALL,
                                                 record_positions=record_positions)
        return out.logits, out.records

      logits, records = full(state, tokens, record_positions)
      cache = encode(state, context)
      cached_logits, cached_records = cached(state, continuations, cache, continuation_positions)
      return dict(logits=logits, records=records, cached_logits=cached_logits, cached_records=cached_records)

    results = {}
    with jax.default_matmul_precision("highest"):
      for family, config in CONFIGS.items():
        rng = np.random.default_rng(0)
        tokens = jnp.asarray(rng.integers(3, config.vocab_size, size=(8, 12)), jnp.int32)
        record_positions = jnp.asarray(rng.integers(0, 12, size=(8, 2)), jnp.int32)
        context = jnp.asarray(rng.integers(3, config.vocab_size, size=(1, 5)), jnp.int32)
        lengths = rng.integers(1, 7, size=8)
        continuations = jnp.asarray([[int(t) if i < n else 0 for i, t in enumerate(rng.integers(3, 90, 6))]
                                     for n in lengths], jnp.int32)
        continuation_positions = jnp.asarray(np.stack([lengths - 1, np.zeros(8, int)], 1), jnp.int32)
        inputs = (tokens, record_positions, context, continuations, continuation_positions)
        expected = run(build_model(config, seed=1), *inputs)
        for mesh_name, spec in MESHES.items():
          mesh = sharding.make_mesh(spec)
          model = sharding.shard_model(build_model(config, seed=1), mesh)
          sharded_inputs = (sharding.shard_batch(tokens, mesh), sharding.shard_batch(record_positions, mesh),
                            sharding.replicate(context, mesh), sharding.shard_batch(continuations, mesh),
                            sharding.shard_batch(continuation_positions, mesh))
          actual = run(model, *sharded_inputs)
          errors = {name: relative_error(actual[name], expected[name]) for name in ("logits", "cached_logits")}
          for kind in ("records", "cached_records"):
            for layer, (got, want) in enumerate(zip(actual[kind], expected[kind])):
              for name in want:
                errors[f"{kind}/{layer}/{name}"] = relative_error(got[name], want[name])
          q_kernel = model.layers[0].attn.q_proj.kernel[...]
          embedding = model.embed.embedding[...]
          results[f"{family}/{mesh_name}"] = dict(
              errors=errors,
              num_records=len(actual["records"]) + len(actual["cached_records"]),
              q_kernel_spec=[str(axis) for axis in q_kernel.sharding.spec],
              q_kernel_shard=list(q_kernel.addressable_shards[0].data.shape),
              embedding_spec=[str(axis) for axis in embedding.sharding.spec],
              tokens_spec=[str(axis) for axis in sharded_inputs[0].sharding.spec],
              devices_used=len(q_kernel.sharding.device_set))
      try:
        sharding.shard_batch(jnp.zeros((6, 4), jnp.int32), sharding.make_mesh({"data": 8}))
        results["uneven_batch_error"] = ""
      except ValueError as error:
        results["uneven_batch_error"] = str(error)
    print("RESULTS " + json.dumps(results))
''')


@pytest.fixture(scope="module")
def multi_device_results():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
  completed = subprocess.run([sys.executable, "-c", WORKER, json.dumps(MESHES)], cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=900)
  assert completed.returncode == 0, completed.stderr[-4000:]
  line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULTS "))
  return json.loads(line[len("RESULTS "):])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_run_equals_single_device(multi_device_results, family, mesh_name):
  result = multi_device_results[f"{family}/{mesh_name}"]
  assert result["num_records"] == 2 * 2  # two layers, full and cached
  assert len(result["errors"]) == 2 + 2 * 2 * 4  # logits x2, (full, cached) x layers x 4 quantities
  worst = max(result["errors"], key=result["errors"].get)
  assert result["errors"][worst] <= TOLERANCE, (worst, result["errors"][worst])
  assert result["devices_used"] == 8
  spec = MESHES[mesh_name]
  # The batch is split over "data" when the mesh has it.
  assert result["tokens_spec"][0] == ("data" if "data" in spec else "None")
  # q_proj [D, N*H] is split over heads along "model" (N*H = 48 or 32 divides 4 and 8).
  if "model" in spec:
    assert result["q_kernel_spec"] == ["None", "model"]
    assert result["q_kernel_shard"][1] == (48 if family == "llama" else 32) // spec["model"]
  else:
    assert result["q_kernel_spec"] in (["None", "None"], [])
  # The llama vocabulary (100) splits over model=4 but not over model=8, where it stays replicated.
  if family == "llama" and mesh_name == "model8":
    assert result["embedding_spec"] in (["None", "None"], [])
  if family == "llama" and mesh_name == "data2_model4":
    assert result["embedding_spec"] == ["model", "None"]


def test_uneven_batch_is_refused(multi_device_results):
  message = multi_device_results["uneven_batch_error"]
  assert message == "batch of 6 rows does not split over mesh axis 'data' of size 8; pad the batch to a multiple of 8"


# ----------------------------------------------------------------------------------------------------
# In-process: rule resolution and mesh specs.


def test_default_rules_on_the_1p3b_model():
  mesh = AbstractMesh((2, 4), ("data", "model"))
  specs = {name: spec for name, spec in _flat_specs(get_config("fairseq-dense-1.3b"), mesh).items()}
  assert specs["embed/embedding"] == P("model", None)
  for projection in ("q_proj", "k_proj", "v_proj"):
    assert specs[f"layers/7/attn/{projection}/kernel"] == P(None, "model")
    assert specs[f"layers/7/attn/{projection}/bias"] == P("model")
  assert specs["layers/7/attn/o_proj/kernel"] == P("model", None)
  assert specs["layers/7/attn/o_proj/bias"] == P(None)
  assert specs["layers/7/mlp/fc1/kernel"] == P(None, "model")
  assert specs["layers/7/mlp/fc1/bias"] == P("model")
  assert specs["layers/7/mlp/fc2/kernel"] == P("model", None)
  assert specs["layers/7/attn_norm/scale"] == P(None)
  assert specs["final_norm/bias"] == P(None)


def test_rules_drop_missing_axes_and_uneven_splits():
  data_only = AbstractMesh((8,), ("data",))
  assert all(spec == P(*([None] * len(spec)))
             for spec in _flat_specs(get_config("smollm2-135m"), data_only).values())
  model8 = AbstractMesh((8,), ("model",))
  specs = _flat_specs(get_config("smollm2-135m"), model8)
  assert specs["layers/0/attn/q_proj/kernel"] == P(None, "model")  # 9 * 64 = 576 = 8 * 72
  assert specs["layers/0/attn/k_proj/kernel"] == P(None, "model")  # 3 * 64 = 192 = 8 * 24
  assert specs["layers/0/mlp/down_proj/kernel"] == P("model", None)  # 1536 = 8 * 192
  assert sharding.partition_spec_for("embed/embedding", (100, 48), model8) == P(None, None)


def test_custom_rules_must_cover_every_parameter():
  mesh = AbstractMesh((2,), ("model",))
  rules = ((r"^embed/embedding$", P("model", None)),)
  with pytest.raises(ValueError, match="no sharding rule matches parameter 'final_norm/scale'"):
    sharding.param_partition_specs(abstract_model(get_config("tiny-llama")), mesh, rules)
  with pytest.raises(ValueError, match="gives 3 dims"):
    sharding.partition_spec_for("final_norm/scale", (32,), mesh, ((r".*", P(None, None, "model")),))


def test_make_mesh_specs():
  devices = jax.devices()[:1]
  mesh = sharding.make_mesh(None, devices)
  assert dict(mesh.shape) == {"data": 1}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
  assert dict(sharding.make_mesh({"data": -1, "model": 1}, devices).shape) == {"data": 1, "model": 1}
  for spec, message in [({"data": 2}, "needs 2 devices but 1 are given"),
                        ({"data": -1, "model": -1}, "at most one mesh axis may be -1"),
                        ({"data": 0}, "must be positive ints or one -1"),
                        ({}, "mesh spec is empty"),
                        ({"data": -1, "model": 2}, "2 does not divide it")]:
    with pytest.raises(ValueError, match=message):
      sharding.make_mesh(spec, devices)


def _flat_specs(config, mesh):
  from dualform.params import path_string
  specs = sharding.param_partition_specs(abstract_model(config), mesh)
  return {path_string(path): variable.get_value() for path, variable in specs.flat_state()}
