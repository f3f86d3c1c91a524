"""Tasks, as optimum names them, and which transformers model class runs each.

Kept free of heavy imports: the export and the verifier both ask "which task is this model?" from
its config.json, and the answer must be the same on both sides.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmconv.errors import CorruptInput, InputError, MissingDependency, UnsafeInput, Unsupported, UsageError

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
    ("MTModel", "text2text-generation"),  # MarianMTModel
    ("ForImageClassification", "image-classification"),
    ("Model", "feature-extraction"),
)

# Task -> (transformers Auto class, the output that holds the model's answer).
TASK_CLASSES: dict[str, tuple[str, str]] = {
    "text-generation": ("AutoModelForCausalLM", "logits"),
    "feature-extraction": ("AutoModel", "last_hidden_state"),
    "fill-mask": ("AutoModelForMaskedLM", "logits"),
    "text-classification": ("AutoModelForSequenceClassification", "logits"),
    "token-classification": ("AutoModelForTokenClassification", "logits"),
    "text2text-generation": ("AutoModelForSeq2SeqLM", "logits"),
    "image-classification": ("AutoModelForImageClassification", "logits"),
}

SUPPORTED_TASKS = sorted({*TASK_CLASSES, "text-generation-with-past", "text2text-generation-with-past"})


def base_task(task: str) -> str:
    """``text-generation-with-past`` -> ``text-generation``."""
    return task.removesuffix("-with-past")


def is_causal(task: str) -> bool:
    return base_task(task) == "text-generation"


def is_seq2seq(task: str) -> bool:
    """An encoder-decoder generating text (T5, BART): two graphs, an encoder and a decoder with its cache."""
    return base_task(task) == "text2text-generation"


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
    tok_cfg = _json_object(folder / "tokenizer_config.json")
    config = _json_object(folder / "config.json")
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


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` (read with ``read_json``); {} when there is no such file or it holds no object."""
    from llmconv.checkpoint import read_json

    value = read_json(path, what=path.name) if path.is_file() else {}
    return value if isinstance(value, dict) else {}


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


# ---- what transformers and optimum are given to read --------------------------------------------------
# transformers imports Python from a local folder in more places than auto_map: ``from_pretrained`` of a
# model with a generate method loads ``custom_generate/generate.py`` (load_custom_generate treats a local
# folder as trusted, whatever trust_remote_code says), and every ``get_class_from_dynamic_module`` copies
# ``*.py`` files out of the folder it is given. So no load gets the model folder itself: each reads a view
# of links to the data files it needs (configs, weights, tokenizer and processor files), each checked by
# our own readers first, and nothing else. What a file holds is checked where it is read (read_json, the
# weight readers); what transformers could run is simply not there.

_VIEW_NAMES = frozenset({
    "config.json", "generation_config.json", "special_tokens_map.json", "added_tokens.json", "merges.txt",
    "preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja",
})
_MODEL_NAMES = frozenset({"config.json", "generation_config.json"})
_VIEW_PREFIXES = ("tokenizer", "vocab", "spiece", "sentencepiece")
_VIEW_SUFFIXES = (".json", ".txt", ".model", ".tiktoken")


# The files a tokenizer builds its vocabulary from (the rest, tokenizer_config.json and the like, only configure it).
_TOKENIZER_DATA = ("tokenizer.json", "vocab.", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece",
                   "spm.model", "bpe.codes")


def _view_file(name: str) -> bool:
    """Whether transformers may read the top-level file ``name`` of a model folder (data, never code)."""
    return name in _VIEW_NAMES or (name.startswith(_VIEW_PREFIXES) and name.endswith(_VIEW_SUFFIXES))


def code_note(folder: Path) -> list[str]:
    """A note naming the model folder's Python, which no load is given; none when it has none."""
    code = _code_in(folder)
    return [f"left out of what transformers reads: {', '.join(code)} ({_NEVER})"] if code else []


def _code_in(folder: Path) -> list[str]:
    """The model folder's Python, top level and one folder down (``evil.py``, ``custom_generate/``)."""
    found: list[str] = []
    with contextlib.suppress(OSError):
        for p in sorted(folder.iterdir()):
            if p.name.endswith((".py", ".pyc")) and not p.is_dir():
                found.append(p.name)
            elif p.is_dir() and not p.is_symlink() and not p.name.startswith("."):
                with contextlib.suppress(OSError):
                    if any(c.name.endswith((".py", ".pyc")) for c in p.iterdir()):
                        found.append(f"{p.name}/")
    return found


@contextlib.contextmanager
def transformers_view(folder: Path | None, *, notes: list[str] | None = None, weights: bool = True,
                      tokenizer: bool = True, config: Path | None = None,
                      weights_from: Path | None = None) -> Iterator[Path]:
    """A temporary folder for transformers and optimum to load from: links to the data files of ``folder`` only.

    The weights are opened with llmconv's own reader first (so a malformed index or shard is the same
    CorruptInput as in a plain conversion), and the index is written afresh from what that reader accepted,
    in the layout transformers requires. Every JSON file linked is read with ``read_json`` first (depth, long
    integers, BOM, config value types). Python files and folders are never linked; ``notes`` names them.

    Args:
        folder: the model folder (an hf folder, or an ONNX model's folder for its tokenizer); None for a bare
            weights file with ``config``.
        notes: receives a note naming the Python left out, and one naming files that are links out of the folder.
        weights: link the weights too (a model load); False for a tokenizer or config alone.
        tokenizer: link the tokenizer and processor files too; False for a model load alone, which reads
            only config.json and generation_config.json (a broken tokenizer file then does not matter).
        config: a config.json to use instead of the folder's (a bare weights checkpoint exported with --config).
        weights_from: a bare weights checkpoint (file, or folder of shards) to use instead of the hf folder's.
    Raises:
        CorruptInput: a file transformers would read is malformed (the message names it).
        UnsafeInput: the config or the weights are links out of the folder.
    Example:
        >>> with transformers_view(Path("gpt2-hf")) as view: AutoConfig.from_pretrained(view)
    """
    import json

    from llmconv.checkpoint import read_json
    from llmconv.formats import registry, sharding
    from llmconv.formats.hf import FORMAT as HF
    from llmconv.formats.hf import check_inside, linked_view, outside_reason

    files: dict[str, Path] = {}
    skipped: list[str] = []
    index: tuple[str, dict[str, Any]] | None = None
    if folder is not None and config is None and (folder / "config.json").exists():
        check_inside(folder, folder / "config.json", what="the config")
    source = weights_from if weights_from is not None else folder if weights else None
    if source is not None:
        with (registry.open_checkpoint(source) if weights_from is not None else HF.open(source)) as src:
            for f in src.files:
                if not source.is_dir():
                    files[WEIGHT_FILE_NAMES[src.weights_format or src.format]] = f
                    continue
                rel = f.relative_to(source).as_posix()
                if rel in (sharding.SAFETENSORS_INDEX, sharding.PYTORCH_INDEX):
                    # The reader accepted it: a dict with a valid weight_map. transformers also needs a
                    # metadata object, and reads the file with no guard of its own.
                    weight_map = read_json(f, what="index file")["weight_map"]
                    index = (rel, {"metadata": {"total_size": src.total_bytes}, "weight_map": weight_map})
                else:
                    files[rel] = f
    if folder is not None:
        with contextlib.suppress(OSError):
            for p in sorted(folder.iterdir()):
                wanted = _view_file(p.name) if tokenizer else p.name in _MODEL_NAMES
                if not wanted or p.name in files or (config is not None and p.name == "config.json"):
                    continue
                reason = outside_reason(folder, p)
                if reason is None:
                    files[p.name] = p
                else:
                    skipped.append(reason)
    if config is not None:
        files["config.json"] = config
    for name, p in files.items():
        if name.endswith(".json"):
            read_json(p, what=name)
    if notes is not None:
        notes.extend(code_note(folder) if folder is not None else [])
        if skipped:
            notes.append("left out of what transformers reads (and of any output): " + "; ".join(skipped))
    with linked_view(files) as view:
        if index is not None:
            (view / index[0]).write_text(json.dumps(index[1]), encoding="utf-8")
        yield view


# The name transformers looks for, by weights format: what a bare weights file is called in a view.
WEIGHT_FILE_NAMES = {"safetensors": "model.safetensors", "pytorch": "pytorch_model.bin"}


def open_tokenizer(folder: Path) -> Any:
    """The tokenizer of the model in ``folder``, loaded by ``AutoTokenizer`` from a ``transformers_view``.

    Raises:
        UnsafeInput: the tokenizer needs code from the folder.
        CorruptInput: tokenizer.json (or another tokenizer file) is malformed.
    Example:
        >>> open_tokenizer(Path("gpt2-hf"))("hello")["input_ids"]
        [31373]
    """
    from transformers import AutoTokenizer

    from llmconv.export._quiet import quiet
    from llmconv.formats.hf import outside_reason

    refuse_tokenizer_code(folder)
    with contextlib.suppress(OSError):
        for p in sorted(folder.iterdir()):
            reason = outside_reason(folder, p) if _view_file(p.name) and p.name not in _MODEL_NAMES else None
            if reason is not None:
                # Left out of the view, transformers would silently build some other tokenizer (or crash).
                raise UnsafeInput(f"the tokenizer cannot be read: {reason}; llmconv reads only files inside the "
                                  "model's folder", path=folder, hint="copy the file into the folder")
    with transformers_view(folder, weights=False) as view:
        try:
            with quiet(), remote_code_refused(folder):
                return AutoTokenizer.from_pretrained(str(view), local_files_only=True, trust_remote_code=False)
        except (AttributeError, TypeError) as e:
            # transformers falls back to a tokenizer class whose files are absent, and trips on the missing path.
            if any(p.name.startswith(_TOKENIZER_DATA) for p in folder.iterdir()):
                raise
            raise InputError("the folder has no tokenizer data (tokenizer.json, vocab.json/merges.txt, vocab.txt "
                             "or a sentencepiece .model), so its text cannot be tokenized", path=folder,
                             hint="copy the model's tokenizer files into the folder") from e
        except Exception as e:
            if type(e) is not Exception:  # the tokenizers library's own error is a bare Exception; ours are not
                raise
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or ["no detail given"]
            path = folder / "tokenizer.json" if (folder / "tokenizer.json").is_file() else folder
            raise CorruptInput(f"the tokenizers library cannot read the tokenizer: {lines[0][:300]}", path=path,
                               hint="fix or replace tokenizer.json (the model's original one)") from None


def check_tokenizer(folder: Path) -> None:
    """Refuse up front a tokenizer in ``folder`` that needs the folder's code or that its library cannot read.

    For commands that tokenize later, from a copy of the files (quantize calibrates on the exported folder):
    the message then names the user's file. A folder without tokenizer.json is left to the later step.
    """
    if (folder / "tokenizer.json").is_file():
        open_tokenizer(folder)  # which refuses code first
    else:
        refuse_tokenizer_code(folder)
