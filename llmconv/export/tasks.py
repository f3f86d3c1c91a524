"""Tasks, as optimum names them, and which transformers model class runs each.

Kept free of heavy imports: the export and the verifier both ask "which task is this model?" from
its config.json, and the answer must be the same on both sides.
"""

from __future__ import annotations

from typing import Any

from llmconv.errors import UsageError

# Suffix of a transformers class name -> task (the first match wins, so longer suffixes come first).
_ARCH_SUFFIX_TASKS: tuple[tuple[str, str], ...] = (
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForMaskedLM", "fill-mask"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMultipleChoice", "multiple-choice"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("Model", "feature-extraction"),
)

# Task -> (transformers Auto class, the output that holds the model's answer).
TASK_CLASSES: dict[str, tuple[str, str]] = {
    "text-generation": ("AutoModelForCausalLM", "logits"),
    "feature-extraction": ("AutoModel", "last_hidden_state"),
    "fill-mask": ("AutoModelForMaskedLM", "logits"),
    "text-classification": ("AutoModelForSequenceClassification", "logits"),
    "token-classification": ("AutoModelForTokenClassification", "logits"),
}

SUPPORTED_TASKS = sorted({*TASK_CLASSES, "text-generation-with-past"})


def base_task(task: str) -> str:
    """``text-generation-with-past`` -> ``text-generation``."""
    return task.removesuffix("-with-past")


def is_causal(task: str) -> bool:
    return base_task(task) == "text-generation"


def task_from_config(config: dict[str, Any]) -> str:
    """The task a model folder is for, from ``architectures`` in its config.json.

    Args:
        config: the parsed config.json.
    Returns:
        A task name without ``-with-past`` (``text-generation``, ``feature-extraction``, ...).
    Example:
        >>> task_from_config({"architectures": ["LlamaForCausalLM"]})
        'text-generation'
    """
    for arch in config.get("architectures") or []:
        for suffix, task in _ARCH_SUFFIX_TASKS:
            if arch.endswith(suffix):
                return task
    # No architectures: a decoder-only model type is a causal LM; anything else, its base model.
    if config.get("is_decoder") or config.get("model_type") in _CAUSAL_TYPES:
        return "text-generation"
    return "feature-extraction"


def check_task(task: str) -> str:
    """Refuse a task the verifier cannot run (it names the ones it can)."""
    if base_task(task) not in TASK_CLASSES:
        raise UsageError(f"task {task!r} is not one llmconv can export and verify",
                         hint="use one of " + ", ".join(SUPPORTED_TASKS))
    return task


_CAUSAL_TYPES = frozenset({
    "gpt2", "llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "gemma2", "gemma3_text", "gpt_neox",
    "gptj", "opt", "bloom", "falcon", "mpt", "starcoder2", "olmo", "olmo2", "stablelm", "codegen", "gpt_bigcode",
    "cohere", "granite", "smollm3", "xglm", "biogpt", "ministral", "mixtral",
})
