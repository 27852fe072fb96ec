"""Tasks, templates and token layout for the ICL-vs-FT comparison.

Submodules (one job each):

  tasks      TaskSpec, TASKS, get_task, Example, DataError, default_data_dir, read_examples, load_pool,
             load_eval_set, eval_order (PROTOCOL §1-§2).
  templates  format_input, answer_text, answer_texts, demonstration_text (PROTOCOL §2).
  packing    Tokenizer, encode_query(ies), max_query_length, demonstration_order, pack_context, prompt_layout,
             zero_shot_context, finetune_sequences, label checks (PROTOCOL §3-§5, §7).
  online     optional converters from TFDS / Hugging Face datasets to the same JSONL schema (lazy imports).
  corpus     plain-text pretraining corpora (another module; import it as ``dualform.data.corpus``).
"""

from dualform.data.packing import (
    DEFAULT_K, DEFAULT_MAX_LEN, EncodedQuery, FinetuneSequences, LabelTokenError, PackedContext,
    PromptLayout, Tokenizer, check_single_token_labels, demonstration_order, encode_queries, encode_query,
    finetune_sequences, label_token_ids, labels_are_single_tokens, max_query_length, pack_context,
    prompt_layout, zero_shot_context)
from dualform.data.tasks import (
    TASK_NAMES, TASKS, DataError, Example, TaskSpec, Template, default_data_dir, eval_order, get_task,
    load_eval_set, load_pool, read_examples)
from dualform.data.templates import answer_text, answer_texts, demonstration_text, format_input

__all__ = [
    "DEFAULT_K", "DEFAULT_MAX_LEN", "EncodedQuery", "FinetuneSequences", "LabelTokenError", "PackedContext",
    "PromptLayout", "Tokenizer", "check_single_token_labels", "demonstration_order", "encode_query",
    "encode_queries", "finetune_sequences", "label_token_ids", "labels_are_single_tokens", "max_query_length", "pack_context",
    "prompt_layout", "zero_shot_context", "TASK_NAMES", "TASKS", "DataError", "Example", "TaskSpec",
    "Template", "default_data_dir", "eval_order", "get_task", "load_eval_set", "load_pool", "read_examples",
    "answer_text", "answer_texts", "demonstration_text", "format_input",
]
