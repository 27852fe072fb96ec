"""The model flags the benchmarks share: a named config on random weights and its dtype, plus (for the
scoring benchmarks) the ICL prefix length and the layer scan, with the H200 run's defaults."""

from __future__ import annotations

from absl import flags


def define_model_flags(*, prefix: bool = False, cache_help: str = "padded ICL prefix length") -> None:
  """Defines --model and --dtype; with ``prefix`` also --cache and --scan_layers."""
  flags.DEFINE_string("model", "fairseq-dense-2.7b", "named config (random weights)")
  flags.DEFINE_string("dtype", "bfloat16", "parameter and compute dtype")
  if prefix:
    flags.DEFINE_integer("cache", 2048, f"{cache_help} (valid length: cache - 100, at least 1)")
    flags.DEFINE_bool("scan_layers", True, "run the layers as one lax.scan (the GPU run's setting)")
    flags.DEFINE_enum("prefix_attention", "xla", ["xla", "cudnn"], "shared-prefix attention implementation")
