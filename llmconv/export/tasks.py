"""Tasks, as optimum names them, and which transformers model class runs each.

Kept free of heavy imports: the export and the verifier both ask "which task is this model?" from
its config.json, and the answer must be the same on both sides.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmconv.errors import MissingDependency, UnsafeInput, Unsupported, UsageError

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


# ---- a model folder's own code is never run ---------------------------------------------------------
# transformers imports Python files from a model folder when its config.json or tokenizer_config.json
# has an ``auto_map`` and no built-in class fits; without ``trust_remote_code=False`` it even asks on
# stdin, and a piped "y" runs them. We decide from the JSON files first, the way transformers decides
# (a built-in class, when there is one, wins over ``auto_map``), and pass ``trust_remote_code=False``
# on every load as well.

_NEVER = "llmconv never runs code from a model folder"


def _code_refs(auto_map: Any) -> list[str]:
    """The class references an ``auto_map`` holds (``evil.EvilConfig``, ``other/repo--mod.Cls``)."""
    if isinstance(auto_map, dict):
        values: list[Any] = list(auto_map.values())
    elif isinstance(auto_map, list | tuple):
        values = list(auto_map)
    else:
        values = [auto_map] if auto_map else []
    refs: list[str] = []
    for v in values:
        refs.extend(_code_refs(v) if isinstance(v, list | tuple) else [v] if isinstance(v, str) and v else [])
    return refs


def _describe_refs(refs: list[str]) -> str:
    """``evil.py: EvilConfig, EvilForCausalLM`` (the files a reader should look at, with their classes)."""
    by_file: dict[str, list[str]] = {}
    for ref in refs:
        repo, _, local = ref.rpartition("--")
        module, _, cls = local.rpartition(".")
        where = module.replace(".", "/") + ".py" if module else local
        if repo:
            where = f"{where} of {repo}"
        by_file.setdefault(where, [])
        if cls and cls not in by_file[where]:
            by_file[where].append(cls)
    return "; ".join(f"{f}: {', '.join(c)}" if c else f for f, c in by_file.items())


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise MissingDependency("running a Hugging Face model needs transformers",
                                hint="pip install 'llmconv[onnx]'") from e
    return transformers


def _transformers_version() -> str:
    return f"transformers {_transformers().__version__}"


def refuse_model_code(config: dict[str, Any], *, path: Path, auto_class: str | None = None) -> None:
    """Refuse a model that transformers could only load by running code from its folder.

    A known ``model_type`` loads with the built-in class even when ``auto_map`` names other code
    (transformers does the same with ``trust_remote_code=False``), unless the Auto class used has no
    built-in class for it.

    Args:
        config: the parsed config.json.
        path: the model folder (or file), for messages.
        auto_class: the transformers Auto class about to load the model (``AutoModelForCausalLM``, ...),
            or None when only the config is concerned.
    Raises:
        UnsafeInput: ``auto_map`` names code and no built-in class fits.
        Unsupported: a ``model_type`` transformers does not know, without ``auto_map``.
    Example:
        >>> refuse_model_code({"model_type": "llama", "auto_map": {"AutoConfig": "x.C"}}, path=Path("m"))
    """
    _transformers()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    refs = _code_refs(config.get("auto_map"))
    # A model_type that is not a string (a JSON list or object) is no name transformers knows either.
    unknown = model_type not in (None, "") and not (isinstance(model_type, str) and model_type in CONFIG_MAPPING_NAMES)
    if unknown and refs:
        raise UnsafeInput(f"config.json asks to run code from the model folder ({_describe_refs(refs)}): "
                          f"{_transformers_version()} has no built-in class for model_type {model_type!r}, "
                          f"and {_NEVER}", path=path,
                          hint="use a model whose architecture transformers has built in; converting the weights "
                               "alone (to safetensors or another hf folder) runs no model code")
    if unknown:
        raise Unsupported(f"{_transformers_version()} does not know model_type {model_type!r} (config.json)",
                          path=path, hint="check the model_type in config.json, or upgrade transformers")
    auto_map = config.get("auto_map")
    if auto_class is None or not isinstance(auto_map, dict) or auto_class not in auto_map:
        return
    if model_type in getattr(_transformers(), auto_class)._model_mapping._model_mapping:
        return  # the built-in class is used; the folder's code is not
    raise UnsafeInput(f"config.json asks to run code from the model folder for {auto_class} "
                      f"({_describe_refs(_code_refs(auto_map[auto_class]))}): {_transformers_version()} has no "
                      f"built-in {auto_class} for model_type {model_type!r}, and {_NEVER}", path=path,
                      hint="only tasks whose transformers class is built in can run it (convert --task)")


def refuse_tokenizer_code(folder: Path) -> None:
    """Refuse a tokenizer that transformers could only load by running code from ``folder``.

    Mirrors ``AutoTokenizer``: ``auto_map`` in tokenizer_config.json (or config.json's
    ``AutoTokenizer`` entry) needs code unless ``tokenizer_class`` names a built-in tokenizer, or,
    without ``tokenizer_class``, the model type has a built-in one.

    Raises:
        UnsafeInput: the tokenizer would need the folder's code.
    Example:
        >>> refuse_tokenizer_code(Path("gpt2-hf"))
    """
    from llmconv.checkpoint import read_json

    tok_cfg: Any = {}
    if (folder / "tokenizer_config.json").is_file():
        tok_cfg = read_json(folder / "tokenizer_config.json", what="tokenizer_config.json")
    if not isinstance(tok_cfg, dict):
        tok_cfg = {}
    config: Any = {}
    if (folder / "config.json").is_file():
        config = read_json(folder / "config.json", what="config.json")
    if not isinstance(config, dict):
        config = {}
    tok_map = tok_cfg.get("auto_map")
    refs = _code_refs(tok_map if isinstance(tok_map, list | tuple) else
                      tok_map.get("AutoTokenizer") if isinstance(tok_map, dict) else None)
    cls_name = tok_cfg.get("tokenizer_class")
    where = "tokenizer_config.json"
    if cls_name is None:
        # transformers then reads config.json through AutoConfig: the model's own rule applies too.
        refuse_model_code(config, path=folder)
        cls_name = config.get("tokenizer_class")
        cfg_map = config.get("auto_map")
        if isinstance(cfg_map, dict) and cfg_map.get("AutoTokenizer"):
            refs, where = _code_refs(cfg_map["AutoTokenizer"]), "config.json"
    if not refs:
        return
    _transformers()
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name

    if isinstance(cls_name, str) and cls_name:
        if tokenizer_class_from_name(cls_name) is not None or tokenizer_class_from_name(cls_name + "Fast"):
            return
    elif isinstance(config.get("model_type"), str) and config["model_type"] in TOKENIZER_MAPPING_NAMES:
        return
    shown = f"tokenizer class {cls_name!r}" if isinstance(cls_name, str) and cls_name else "the tokenizer"
    raise UnsafeInput(f"{where} asks to run code from the model folder for {shown} ({_describe_refs(refs)}), "
                      f"which {_transformers_version()} has no built-in class for, and {_NEVER}", path=folder,
                      hint="use a tokenizer.json that a built-in tokenizer class reads, or give token ids in an "
                           ".npz file instead of text")


@contextlib.contextmanager
def remote_code_refused(path: Path) -> Iterator[None]:
    """Turn transformers' refusal under ``trust_remote_code=False`` into UnsafeInput.

    The checks above decide first; this catches a case they missed (transformers raises ValueError
    naming ``trust_remote_code``), so that it reads as the user's input, not as our bug. Nothing ran:
    transformers refuses before importing anything.
    """
    try:
        yield
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise UnsafeInput(f"the model folder needs its own code to load, and {_NEVER}", path=path) from None
