"""Facts about a model read from its architecture: which parameters are tied, which are embeddings.

transformers decides what ``save_pretrained`` stores and what ``from_pretrained`` ties again from the
model class, not from names: ``tie_weights()`` makes several names one Parameter (GPT-2's
``lm_head.weight`` and ``transformer.wte.weight``; BART's ``model.shared.weight``, both stacks'
``embed_tokens.weight`` and ``lm_head.weight``), and ``save_pretrained`` keeps one name of each group,
dropping those its ``_tied_weights_keys`` (and ``_dynamic_tied_weights_keys``) declare. This module
asks the class the same questions: it builds the model for a config.json on the meta device (no
memory for the weights, no code from the model folder: only transformers' built-in classes, as with
``trust_remote_code=False``) and reads the answers off it.

Fallbacks (:func:`describe` returns None, :func:`unavailable_reason` says why):

- no config at all (a bare weights file): callers keep their name-based rules (tied output heads by
  suffix in :mod:`llmconv.checkpoint`, embeddings and heads by regex in :mod:`llmconv.transforms.prune`);
- transformers is not installed, the config's ``model_type`` is one transformers does not know, or
  it asks for the folder's own code: the same name-based rules;
- the config cannot be built into a model (values the class rejects): the same name-based rules.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Architecture:
    """What the model class of a config says about its parameters (names as its state dict spells them).

    Attributes:
        model_class: the transformers class built (``BartForConditionalGeneration``, ...).
        prefix: its ``base_model_prefix``; checkpoints saved from the base model lack it.
        parameters: every parameter name, tied ones included.
        tied: groups of names that are one Parameter after ``tie_weights()`` (tied again on load).
        tied_keys: the patterns ``save_pretrained`` drops from a group of shared tensors.
        embeddings: parameter name -> the embedding module's class, for every ``nn.Embedding`` (subclasses
            included) and the input embedding.
        heads: parameter name -> why it is an output head: the output embedding, and the task head outside
            the base model (``classifier``, ``score``, ...).
        layers: module name -> ``linear`` (``nn.Linear``: weight [out, in]), ``conv1d`` (transformers' ``Conv1D``,
            GPT-2's: weight [in, out]), ``embedding`` (``nn.Embedding``) or the class name, for every module that
            holds a ``weight`` parameter of its own (what a LoRA adapter can target).
    """

    model_class: str
    prefix: str
    parameters: frozenset[str]
    tied: tuple[frozenset[str], ...]
    tied_keys: tuple[str, ...]
    embeddings: dict[str, str]
    heads: dict[str, str]
    layers: dict[str, str]

    def own_name(self, name: str) -> str | None:
        """``name`` as this class spells it (a checkpoint of the base model lacks the prefix), or None."""
        for candidate in self._spellings(name):
            if candidate in self.parameters:
                return candidate
        return None

    def _spellings(self, name: str) -> Iterator[str]:
        yield name
        if self.prefix:
            if name.startswith(self.prefix + "."):
                yield name[len(self.prefix) + 1:]
            else:
                yield f"{self.prefix}.{name}"

    def group(self, name: str) -> frozenset[str] | None:
        """The tied group ``name`` belongs to (in this class's spelling), or None when it is not tied."""
        own = self.own_name(name)
        return next((g for g in self.tied if own in g), None) if own else None

    def ties(self, a: str, b: str) -> bool:
        """Whether the model ties ``a`` and ``b`` on load (the same Parameter after ``tie_weights()``)."""
        group, other = self.group(a), self.own_name(b)
        return group is not None and other is not None and other in group

    def kept(self, names: Iterable[str]) -> str:
        """Of names sharing one tensor, the one ``save_pretrained(safe_serialization=True)`` stores.

        Its rule: in sorted order, names matching a ``_tied_weights_keys`` pattern are dropped, as long
        as one name is left; so the kept name is the first that matches none, else the last.
        """
        ordered = sorted(names)
        declared = [n for n in ordered if self._declared_tied(n)]
        rest = [n for n in ordered if n not in declared]
        return rest[0] if rest else declared[-1]

    def _declared_tied(self, name: str) -> bool:
        own = self.own_name(name) or name
        return any(re.search(pattern, own) for pattern in self.tied_keys)

    def embedding_of(self, name: str) -> str | None:
        """The embedding module class ``name`` belongs to, or is tied to; None for other parameters."""
        return self._member(name, self.embeddings)

    def head_of(self, name: str) -> str | None:
        """Why ``name`` is part of the output head (or tied to it); None for other parameters."""
        return self._member(name, self.heads)

    def _member(self, name: str, table: dict[str, str]) -> str | None:
        """``table``'s entry for ``name``, or for a parameter it is tied to (saying so); None otherwise."""
        own = self.own_name(name)
        if own is None:
            return None
        if own in table:
            return table[own]
        tied = sorted(n for n in self.group(own) or () if n in table)
        return f"{table[tied[0]]} through {tied[0]}, tied to it" if tied else None


def describe(config: dict[str, Any] | None) -> Architecture | None:
    """The architecture of ``config``, read from its transformers class built on the meta device.

    Args:
        config: a parsed config.json, or None (a bare weights file).
    Returns:
        The Architecture, or None when it cannot be known (:func:`unavailable_reason` says why); callers
        then keep their name-based rules. Cached per config (on its JSON text).
    Example:
        >>> describe({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}).tied
        (frozenset({'transformer.wte.weight', 'lm_head.weight'}),)
    """
    found = _read(config)
    return found if isinstance(found, Architecture) else None


def unavailable_reason(config: dict[str, Any] | None) -> str | None:
    """Why :func:`describe` returns None for ``config`` (None when it does not)."""
    found = _read(config)
    return found if isinstance(found, str) else None


def _read(config: dict[str, Any] | None) -> Architecture | str:
    if config is None:
        return "no config.json"
    try:
        text = json.dumps(config, sort_keys=True)
    except (TypeError, ValueError):
        return "config.json holds values that are not JSON"
    return _from_json(text)


@functools.lru_cache(maxsize=64)
def _from_json(text: str) -> Architecture | str:
    from llmconv.errors import MissingDependency, UnsafeInput, Unsupported
    from llmconv.export.tasks import refuse_model_code

    config = json.loads(text)
    try:
        refuse_model_code(config, path=Path("config.json"))
    except (MissingDependency, UnsafeInput, Unsupported) as e:
        return e.bare_message
    model_type = config.get("model_type")
    if not model_type:
        return "config.json names no model_type"
    if (big := _repeats_beyond_bound(config)) is not None:
        return big
    try:
        model, cls = _build(config)
    except _BuildFailed as e:
        return str(e)
    return _describe_model(model, cls)


# Building a model on the meta device costs no memory for its weights, but every layer is Python objects:
# a config asking for a million layers (hostile, or a typo) would take minutes and gigabytes. No real model
# repeats a layer or an expert more than a few hundred times.
_MAX_REPEATS = 4096
_REPEAT_KEY = re.compile(r"layer|expert|block|depth", re.IGNORECASE)


def _repeats_beyond_bound(config: Any, _key: str = "") -> str | None:
    """Why ``config`` asks for too many repeated modules to build (a count of layers, experts, ...), or None."""
    if isinstance(config, dict):
        for key, value in config.items():
            if (found := _repeats_beyond_bound(value, str(key))) is not None:
                return found
        return None
    values = config if isinstance(config, list) else [config]
    total = sum(v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0)
    if _REPEAT_KEY.search(_key) and total > _MAX_REPEATS:
        return f"config.json asks for {total} of {_key!r}, more than the {_MAX_REPEATS} llmconv builds to read " \
               "the model"
    return None


class _BuildFailed(Exception):
    pass


def _build(config: dict[str, Any]) -> tuple[Any, type]:
    """The model of ``config`` on the meta device, weights tied; only transformers' built-in classes."""
    import torch
    import transformers
    from transformers.modeling_utils import no_init_weights
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    with _quiet(transformers):
        try:
            cfg = CONFIG_MAPPING[config["model_type"]].from_dict(config)
        except Exception as e:  # noqa: BLE001 - any value the config class rejects means "cannot be known"
            raise _BuildFailed(f"transformers cannot read config.json ({type(e).__name__}: {e})") from e
        cls = _model_class(config, cfg, transformers)
        if cls is None:
            raise _BuildFailed(f"transformers has no model class for model_type {config['model_type']!r}")
        try:
            with torch.device("meta"), no_init_weights():
                model = cls(cfg)
            model.tie_weights()
        except Exception as e:  # noqa: BLE001 - a class that rejects these values: fall back to names
            raise _BuildFailed(f"{cls.__name__} cannot be built from config.json ({type(e).__name__}: {e})") from e
    return model, cls


def _model_class(config: dict[str, Any], cfg: Any, transformers: Any) -> type | None:
    """The class named in ``architectures`` when transformers has it built in for this config, else AutoModel's."""
    names = config.get("architectures") or []
    for name in names[:1]:
        cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
        if (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
                and isinstance(cfg, cls.config_class)):
            return cls
    mapping = transformers.AutoModel._model_mapping
    try:
        return mapping[type(cfg)]
    except KeyError:
        return None


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """transformers' warnings about a config (deprecated keys, ...) are not ours to print."""
    logging = transformers.utils.logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _describe_model(model: Any, cls: type) -> Architecture:
    import torch
    from transformers.modeling_utils import _get_tied_weight_keys

    by_param: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), []).append(name)
    params = frozenset(n for names in by_param.values() for n in names)
    tied = tuple(frozenset(names) for names in by_param.values() if len(names) > 1)

    embeddings: dict[str, str] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, torch.nn.Embedding):
            for pname, _ in mod.named_parameters(recurse=False):
                embeddings[f"{mod_name}.{pname}" if mod_name else pname] = f"{type(mod).__name__} (an nn.Embedding)"
    modules: dict[int, list[str]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        modules.setdefault(id(mod), []).append(mod_name)
    heads: dict[str, str] = {}
    for what, getter in (("input embedding", model.get_input_embeddings),
                         ("output embedding", model.get_output_embeddings)):
        with contextlib.suppress(NotImplementedError, AttributeError):
            mod = getter()
            if isinstance(getattr(mod, "weight", None), torch.nn.Parameter):
                target = embeddings if what == "input embedding" else heads
                for mod_name in modules.get(id(mod), []):
                    target.setdefault(f"{mod_name}.weight", f"the model's {what} ({type(mod).__name__})")
    layers = {name: _layer_kind(mod) for name, mod in model.named_modules()
              if isinstance(getattr(mod, "weight", None), torch.nn.Parameter) and "weight" in mod._parameters}
    prefix = getattr(cls, "base_model_prefix", "") or ""
    base = getattr(model, prefix, None) if prefix else None
    if isinstance(base, torch.nn.Module) and base is not model:
        # The task head: what the class adds on top of its base model (lm_head, classifier, score, ...).
        for name, p in model.named_parameters(remove_duplicate=False):
            if not name.startswith(prefix + ".") and p.ndim >= 2:
                heads.setdefault(name, f"the output head ({cls.__name__} adds it to its base model)")
    return Architecture(model_class=cls.__name__, prefix=prefix, parameters=params, tied=tied,
                        tied_keys=tuple(dict.fromkeys(_get_tied_weight_keys(model))),
                        embeddings=embeddings, heads=heads, layers=layers)


def _layer_kind(mod: Any) -> str:
    import torch

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers moved it
        Conv1D = ()  # noqa: N806
    if isinstance(mod, torch.nn.Linear):
        return "linear"
    if isinstance(mod, Conv1D):
        return "conv1d"
    if isinstance(mod, torch.nn.Embedding):
        return "embedding"
    return type(mod).__name__
