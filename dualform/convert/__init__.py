"""Checkpoint ports into :class:`~dualform.models.transformer.Transformer` (GGUF, HF safetensors, fairseq .pt).

Every port builds the model abstractly (``abstract_model``) and fills it through an explicit key map
(:mod:`dualform.convert.keymaps`). Modules: :mod:`~dualform.convert.gguf` (llama GGUF),
:mod:`~dualform.convert.hf` (``XGLMForCausalLM``, ``LlamaForCausalLM``), :mod:`~dualform.convert.fairseq`
(dense ``model.pt``). Users normally call :func:`dualform.loading.load_pretrained` instead.
"""

from dualform.convert.keymaps import Target, fill_model, matching_named_config
