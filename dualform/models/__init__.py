"""Decoder-only Transformers (fairseq dense GPT, Llama) in Flax NNX, their configs and hook points."""

from dualform.models.config import (NAMED_CONFIGS, PUBLISHED_PARAM_COUNTS, TransformerConfig, get_config,
                                    tiny_config)
from dualform.models.transformer import (RECORD_ALL, ForwardOutput, KVCache, RecordSpec, Transformer,
                                         abstract_model, build_model, param_count, set_attention,
                                         set_prefix_attention)
