"""LoRA adapters: what a PEFT adapter folder holds, how it fits a base model, and the weights it adds.

A LoRA adapter changes a module ``M`` of the base (a Linear, GPT-2's Conv1D, an Embedding) by
``delta = B @ A * scale`` with ``A`` = ``base_model.model.M.lora_A.weight`` [r, in], ``B`` = ``...lora_B.weight``
[out, r] and ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``; ``rank_pattern`` and
``alpha_pattern`` set them per module, matched as PEFT matches them). A Conv1D stores its weight [in, out], so its
delta is transposed; an Embedding's pair is ``lora_embedding_A`` [r, num_embeddings] / ``lora_embedding_B``
[dim, r], its delta ``(B @ A).T``. Other tensors of the file (``modules_to_save``, a saved embedding layer,
biases trained with ``bias="all"``) replace the base's tensor of the same name.

PEFT variants whose update is not that sum (DoRA, LoRA biases, activated LoRA, ...) and other PEFT types are
refused by name: merging them as plain LoRA would write a different model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from llmconv.checkpoint import TensorSource, dtype_name
from llmconv.errors import ConversionError, CorruptInput, InputError, Unsupported
from llmconv.io import human_size

PREFIX = "base_model.model."
_LORA_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A",
                  ".lora_embedding_B": "B"}
# adapter_config.json keys whose non-empty value makes the update something other than B @ A * scale.
_VARIANTS = {
    "use_dora": "DoRA (use_dora: a learned magnitude per output)",
    "lora_bias": "LoRA bias terms (lora_bias)",
    "use_qalora": "QALoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens: the update applies only after "
                               "its invocation tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "megatron_config": "Megatron parallel layers (megatron_config)",
    "kasa_config": "KaSA (kasa_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
}
# Keys that do not change what the adapter adds at inference (initialisation, bookkeeping, training).
_NEUTRAL = {
    "base_model_name_or_path", "revision", "peft_type", "task_type", "inference_mode", "auto_mapping", "peft_version",
    "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "modules_to_save", "fan_in_fan_out", "bias", "lora_dropout",
    "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "qalora_group_size",
    "megatron_core", "runtime_config", "ensure_weight_tying", "modules_to_tie",
}
# init_lora_weights values with which PEFT, on loading the adapter, replaces each target's base weight by a residual
# (PiSSA/OLoRA/CorDA: W - the initial B @ A; LoftQ: the quantized weight; LoRA-GA: W - scale * initial B @ A).
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "lora-ga")
_USE_PEFT = "merge it with PEFT itself, with merge_and_unload()"
_NOT_LORA_HINT = "llmconv merges LoRA adapters (peft_type LORA); merge others with PEFT itself"


@dataclass(frozen=True)
class LoraModule:
    """One module the adapter changes."""

    module: str  # the base's module name (model.layers.0.self_attn.q_proj)
    a: str  # the adapter's tensor names
    b: str
    rank: int
    alpha: float
    scale: float
    embedding: bool  # lora_embedding_A/B (an nn.Embedding), else lora_A/lora_B


@dataclass
class Adapter:
    """A LoRA adapter folder, read: its config, weights and the modules it changes.

    Attributes:
        path: the folder.
        config: its adapter_config.json.
        source: its weights (names as the file has them).
        modules: base module name -> LoraModule.
        replaced: base tensor name -> the adapter tensor that replaces it.
        weight: the factor its update is multiplied by (``merge --weights``).
    """

    path: Path
    config: dict[str, Any]
    source: TensorSource
    modules: dict[str, LoraModule]
    replaced: dict[str, str]
    weight: float = 1.0

    def close(self) -> None:
        self.source.close()


def open_adapter(path: Path, *, weight: float = 1.0) -> Adapter:
    """Open a PEFT LoRA folder and read what it changes (not yet checked against a base: :func:`fit`).

    Raises:
        InputError: not an adapter folder; a LoRA weight without its pair; a rank that disagrees with the config.
        Unsupported: another PEFT type, or a LoRA variant whose update is not ``B @ A * scale`` (named).
    """
    from llmconv.formats import registry
    from llmconv.formats.peft import FORMAT

    path = Path(path)
    if registry.detect(path) is not FORMAT:
        raise InputError("not a PEFT adapter folder (adapter_config.json + adapter_model.safetensors or .bin)",
                         path=path, hint="give the folder PEFT's save_pretrained wrote")
    src = FORMAT.open(path)
    try:
        config = src.details["adapter_config"]
        _refuse_variants(config, path)
        modules, replaced = _read_modules(src, config, path)
    except BaseException:
        src.close()
        raise
    return Adapter(path=path, config=config, source=src, modules=modules, replaced=replaced, weight=weight)


def _refuse_variants(config: dict[str, Any], path: Path) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise Unsupported(f"PEFT type {peft_type!r} is not LoRA" if peft_type else
                          "adapter_config.json names no peft_type", path=path / "adapter_config.json",
                          hint=_NOT_LORA_HINT)
    for key, what in _VARIANTS.items():
        if config.get(key):
            raise Unsupported(f"the adapter uses {what}, which llmconv does not merge",
                              path=path / "adapter_config.json", hint=_USE_PEFT)
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise Unsupported(f"the adapter was initialised with init_lora_weights={init!r}, which PEFT applies by "
                          "rewriting the base's weights when it loads the adapter: its lora_A/lora_B are an update to "
                          "that residual base, not to the base given", path=path / "adapter_config.json",
                          hint="have PEFT save it as a plain LoRA (save_pretrained(..., "
                               "path_initial_model_for_weight_conversion=...)) and merge that")
    unknown = sorted(k for k, v in config.items() if k not in _NEUTRAL and k not in _VARIANTS and v not in
                     (None, False, [], {}, "", 0))
    if unknown:
        raise Unsupported(f"adapter_config.json sets {', '.join(unknown)}, which llmconv does not know: it cannot "
                          "tell whether the update is still B @ A * scale", path=path / "adapter_config.json",
                          hint=_USE_PEFT)


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """``rank_pattern``/``alpha_pattern``'s value for ``module``, matched as PEFT's ``get_pattern_key`` does."""
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def _read_modules(src: TensorSource, config: dict[str, Any], path: Path) -> tuple[dict[str, LoraModule],
                                                                                  dict[str, str]]:
    pairs: dict[str, dict[str, str]] = {}
    kinds: dict[str, bool] = {}
    replaced: dict[str, str] = {}
    for name in src.infos:
        if not name.startswith(PREFIX):
            raise CorruptInput(f"tensor {name!r} is not named as PEFT names adapter weights ({PREFIX}...)",
                               path=src.files[0] if src.files else path)
        rest = name[len(PREFIX):]
        if rest.endswith(".lora_magnitude_vector") or ".lora_magnitude_vector." in rest:
            raise Unsupported(f"tensor {name!r} is a DoRA magnitude, which llmconv does not merge", path=path,
                              hint=_USE_PEFT)
        if re.search(r"\.lora_[AB]\.bias$", rest):
            raise Unsupported(f"tensor {name!r} is a LoRA bias (lora_bias), which llmconv does not merge", path=path,
                              hint=_USE_PEFT)
        for suffix, side in _LORA_SUFFIXES.items():
            if rest.endswith(suffix):
                module = rest[: -len(suffix)]
                pairs.setdefault(module, {})[side] = name
                kinds[module] = "embedding" in suffix
                break
        else:
            if ".lora_" in rest:
                raise CorruptInput(f"tensor {name!r} is no LoRA weight llmconv knows (lora_A/lora_B.weight, "
                                   "lora_embedding_A/B)", path=path)
            replaced[rest.replace(".base_layer.", ".")] = name
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    modules = {}
    for module, pair in sorted(pairs.items()):
        for side in ("A", "B"):
            if side not in pair:
                have = pair["B" if side == "A" else "A"]
                missing = have.replace("lora_B", "lora_A").replace("lora_embedding_B", "lora_embedding_A") \
                    if side == "A" else have.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
                raise InputError(f"missing adapter weight {missing} (the file has {have} but not its pair)", path=path)
        a, b = src.infos[pair["A"]], src.infos[pair["B"]]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise CorruptInput(f"{module}: lora_A is {list(a.shape)} and lora_B {list(b.shape)}; they must be "
                               "[r, in] and [out, r]", path=path)
        rank = a.shape[0]
        want = pattern_value(config.get("rank_pattern") or {}, module, r_default)
        if rank != want:
            says = f"says r={want}" if "r" in config else f"has no r (PEFT's default is {want})"
            raise InputError(f"{module}: the adapter's weights have rank {rank} but adapter_config.json {says}",
                             path=path, hint="the config and weights are of different adapters")
        alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, alpha_default))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        modules[module] = LoraModule(module, pair["A"], pair["B"], rank, alpha, scale, kinds[module])
    if not modules and not replaced:
        raise InputError("the adapter holds no weights", path=path)
    for name, info in src.infos.items():  # an adapter is small: every value is checked
        if info.dtype.is_floating_point and not bool(torch.isfinite(src.tensor(name)).all()):
            raise CorruptInput(f"tensor {name!r} holds NaN or infinite values", path=src.files[0] if src.files
                               else path, hint="the adapter's training diverged or the file is damaged")
    return modules, replaced


# --- fitting an adapter to a base -------------------------------------------------------------------------


def _targets(config: dict[str, Any], module: str) -> bool:
    """Whether PEFT's ``check_target_module_exists`` would put a LoRA layer on ``module``."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, module):
                return False
        elif module in exclude or any(module.endswith(f".{k}") for k in exclude):
            return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in config.get("modules_to_save") or []):
        return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if not (module in targets or any(module.endswith(f".{t}") for t in targets)):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    pattern = config.get("layers_pattern")
    match = None
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
            if match:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


@dataclass
class Fit:
    """How adapters apply to one base: per stored base tensor, its updates and replacement."""

    updates: dict[str, list[tuple[Adapter, LoraModule, str]]] = field(default_factory=dict)  # name -> (ad, mod, kind)
    replaced: dict[str, tuple[Adapter, str]] = field(default_factory=dict)
    # stored name -> the model's parameter name, where they differ (a base saved without the class's prefix)
    model_names: dict[str, str] = field(default_factory=dict)


def fit(adapters: list[Adapter], base: TensorSource, layers: dict[str, str] | None,
        tied_groups: tuple[frozenset[str], ...] = (), prefix: str = "") -> Fit:
    """Check that each adapter is for ``base`` and say which base tensors change.

    Args:
        adapters: from :func:`open_adapter`.
        base: the base model's weights (an hf folder).
        layers: module name -> kind (``linear``/``conv1d``/``embedding``/class name) from the base's architecture
            (:attr:`llmconv.architecture.Architecture.layers`), or None when it cannot be built (shapes decide).
        tied_groups: names the model's class makes one parameter (:attr:`~llmconv.architecture.Architecture.tied`):
            GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``, a tied Gemma's head and embedding.
        prefix: the class's ``base_model_prefix`` (``transformer``): a checkpoint saved from the base model stores
            ``h.0.attn.c_attn.weight`` for the model's ``transformer.h.0.attn.c_attn.weight``, as transformers reads.
    Raises:
        InputError: a module the base lacks, a shape that does not match, a target module with no weights, a
            target the base has no module for, a tied weight the adapter would change on one side only, two
            adapters replacing the same tensor. Each names the adapter, the module and the mismatch.
    """
    out = Fit()
    names = set(base.infos)
    tied = _tied_names(base, tied_groups)

    def stored(name: str) -> str:
        """``name`` (the model's) as the base stores it."""
        if name not in names and prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in names:
            out.model_names[name[len(prefix) + 1:]] = name
            return name[len(prefix) + 1:]
        return name

    module_names = set(layers) if layers is not None else {n.rsplit(".", 1)[0] for n in names if n.endswith(".weight")}
    for ad in adapters:
        where = ad.path
        for module, lm in ad.modules.items():
            wname = f"{module}.weight"
            if wname in tied or stored(wname) in tied:
                raise InputError(f"the adapter changes {wname}, which the base ties to {tied[wname]}: PEFT's "
                                 "unmerged model changes only one of them and a merged file cannot", path=where,
                                 hint="untie them first (tie_word_embeddings: false, both stored)")
            wname = stored(wname)
            if wname not in names:
                raise InputError(f"the adapter changes {module}, which the base has no weight for "
                                 f"({wname} is not in {base.path}): an adapter for another base?", path=where)
            if not _targets(ad.config, module):
                raise InputError(f"the adapter holds LoRA weights for {module}, which adapter_config.json does not "
                                 "target (PEFT would ignore them)", path=where)
            kind = _kind(lm, base, layers, ad.config)
            a, b = ad.source.infos[lm.a].shape, ad.source.infos[lm.b].shape
            delta = {"linear": (b[0], a[1]), "conv1d": (a[1], b[0]), "embedding": (a[1], b[0])}[kind]
            have = base.infos[wname].shape
            if tuple(have) != delta:
                raise InputError(f"{module}: the base's weight is {list(have)} but the adapter's update is "
                                 f"{list(delta)} ({kind}, rank {lm.rank}): an adapter for another base?", path=where)
            out.updates.setdefault(wname, []).append((ad, lm, kind))
        for target, name in ad.replaced.items():
            target = stored(target)
            if target in tied:
                raise InputError(f"the adapter replaces {target}, which the base ties to {tied[target]}",
                                 path=where, hint="untie them first (tie_word_embeddings: false, both stored)")
            if target not in names:
                raise InputError(f"the adapter holds {name} for {target}, which the base lacks: an adapter for "
                                 "another base?", path=where)
            if tuple(base.infos[target].shape) != tuple(ad.source.infos[name].shape):
                raise InputError(f"{target}: the base's tensor is {list(base.infos[target].shape)} but the "
                                 f"adapter's is {list(ad.source.infos[name].shape)}: an adapter for another base?",
                                 path=where)
            if target in out.replaced:
                raise InputError(f"two adapters replace {target} ({out.replaced[target][0].path} and {where})",
                                 path=where, hint="merge them one at a time")
            out.replaced[target] = (ad, name)
        _check_targets(ad, module_names, layers)
    for target, (ad, name) in out.replaced.items():
        # A LoRA'd embedding is saved whole (PEFT's save_embedding_layers, as ``...base_layer.weight``) and its
        # update applies on top; a module saved in full (modules_to_save) is never also a LoRA target.
        others = [a for a, _, _ in out.updates.get(target, []) if a is not ad or ".base_layer." not in name]
        if others:
            raise InputError(f"{target} is both replaced (by {ad.path}) and changed by LoRA (by {others[0].path})",
                             path=ad.path, hint="merge them one at a time")
    return out


def _tied_names(base: TensorSource, groups: tuple[frozenset[str], ...]) -> dict[str, str]:
    """Name -> a name it is tied to: the base's shared tensors, and the class's tied parameters (save_pretrained
    stores one name of each group, so the file alone does not show them)."""
    out = {}
    for alias, canon in base.aliases.items():
        out[alias], out[canon] = canon, alias
    for group in groups:
        for name in group:
            out.setdefault(name, ", ".join(sorted(group - {name})))
    return out


def _kind(lm: LoraModule, base: TensorSource, layers: dict[str, str] | None, config: dict[str, Any]) -> str:
    """What ``lm.module`` is in the base (``linear``, ``conv1d`` or ``embedding``): its class when the architecture
    is known, else what the weights and ``fan_in_fan_out`` say."""
    if layers is not None and lm.module in layers:
        kind = layers[lm.module]
        if kind not in ("linear", "conv1d", "embedding"):
            raise Unsupported(f"the adapter changes {lm.module}, a {kind}: llmconv merges LoRA on Linear, Conv1D "
                              "and Embedding layers", path=base.path)
        if (kind == "embedding") != lm.embedding:
            raise InputError(f"{lm.module} is a{'n embedding' if kind == 'embedding' else ' ' + kind} in the base but "
                             f"the adapter holds {'embedding' if lm.embedding else 'linear'} LoRA weights for it",
                             path=base.path)
        return kind
    if lm.embedding:
        return "embedding"
    return "conv1d" if config.get("fan_in_fan_out") else "linear"


def _check_targets(ad: Adapter, module_names: set[str], layers: dict[str, str] | None) -> None:
    """Each ``target_modules`` entry names a module of the base, and each targeted module has weights."""
    targets = ad.config.get("target_modules")
    if targets is None:
        return
    adaptable = {m for m in module_names if layers is None or layers.get(m) in ("linear", "conv1d", "embedding")}
    if targets == "all-linear":
        wanted: set[str] = set()  # PEFT picks the linear layers itself; only what the file holds can be checked
    else:
        wanted = {m for m in adaptable if _targets(ad.config, m)}
        if isinstance(targets, str):
            if not any(re.fullmatch(targets, m) for m in module_names):
                raise InputError(f"adapter_config.json's target_modules {targets!r} matches no module of the base",
                                 path=ad.path, hint="an adapter for another base?")
        else:
            for t in targets:
                if not any(m == t or m.endswith(f".{t}") for m in module_names):
                    raise InputError(f"adapter_config.json targets {t!r}, which the base has no module for: an "
                                     "adapter for another base?", path=ad.path)
    missing = sorted(wanted - set(ad.modules))
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise InputError(f"missing adapter weight: adapter_config.json targets {shown} but the file holds no "
                         f"lora_A/lora_B for {'it' if len(missing) == 1 else 'them'}", path=ad.path,
                         hint="the weights file is incomplete or of another adapter")


# --- the merged weights ------------------------------------------------------------------------------------


def add_update(acc: torch.Tensor, ad: Adapter, lm: LoraModule, kind: str) -> None:
    """``acc += B @ A * scale * weight`` in place (``acc`` float32, laid out as the base's weight: a Conv1D's and an
    Embedding's transposed), with no full-size temporary."""
    a = ad.source.tensor(lm.a).to(torch.float32)
    b = ad.source.tensor(lm.b).to(torch.float32)
    target = acc.T if kind in ("conv1d", "embedding") else acc
    target.addmm_(b, a, alpha=lm.scale * ad.weight)


def merged_tensor(base: TensorSource, plan: Fit, name: str, *, rounded: bool = True) -> torch.Tensor:
    """Base tensor ``name`` with the adapters applied: replaced, then every update added in float32; cast back to the
    base's dtype unless ``rounded`` is False (the float32 values before that one rounding)."""
    dtype = base.infos[name].dtype
    updates = plan.updates.get(name, [])
    if name in plan.replaced:
        ad, src_name = plan.replaced[name]
        t = ad.source.tensor(src_name)
    else:
        t = base.loader(name)
        if not updates:
            return t if rounded or not t.is_floating_point() else t.to(torch.float32)
    acc = t.to(torch.float32, copy=True)
    for ad, lm, kind in updates:
        add_update(acc, ad, lm, kind)
    if not rounded:
        return acc
    out = acc.to(dtype)
    if dtype == torch.float16 and not bool(torch.isfinite(out).all()):  # never an inf written for a finite merge
        raise ConversionError(f"merged tensor {name!r} has a value of magnitude {float(acc.abs().max()):.6g}, past "
                              "float16's maximum 65504: it would be written as inf",
                              hint="merge into a bfloat16 or float32 copy of the base (llmconv convert BASE COPY "
                                   "--dtype bf16)")
    return out


def merged_source(base: TensorSource, plan: Fit) -> TensorSource:
    """``base`` with every update added (in float32, then cast to the tensor's dtype) and replacement swapped in,
    computed when a writer asks for the tensor: one tensor at a time."""
    details = dict(base.details)
    details.pop("notes", None)
    return replace(base, loader=lambda name: merged_tensor(base, plan, name), zero_copy=False, details=details,
                   _closers=[])


def rounded_reference(base: TensorSource, plan: Fit) -> TensorSource:
    """What the written file must hold: each merged tensor's float32 value (the one checked against the unmerged
    reference) rounded by a plain cast to the base's dtype, the other tensors the base's: the read-back's reference,
    computed apart from the writer's rounding path."""
    def load(name: str) -> torch.Tensor:
        if name in plan.updates or name in plan.replaced:
            return merged_tensor(base, plan, name, rounded=False).to(base.infos[name].dtype)
        return base.loader(name)

    return replace(base, loader=load, zero_copy=False, details={}, _closers=[])


def rounding_loss(base: TensorSource, plan: Fit, written: TensorSource) -> float:
    """How much of the merged tensors' update the rounding to the base's dtype changed: ``|written - exact| /
    |exact - base|`` over every updated tensor (0 for a float32 base; 1 would be an update lost in rounding)."""
    err = upd = 0.0
    for name in plan.updates:
        exact = merged_tensor(base, plan, name, rounded=False)
        err += float((written.tensor(name).to(torch.float32) - exact).square().sum())
        upd += float((exact - base.loader(name).to(torch.float32)).square().sum())
    return math.sqrt(err / upd) if upd else 0.0


def unrounded_patch(base: TensorSource, plan: Fit) -> Callable[[Any], str]:
    """For a base stored in fp16/bf16: a function that sets a loaded merged model's changed parameters to their
    float32 values before the rounding to the base's dtype (one tensor at a time), so that the merge's arithmetic is
    checked against the unmerged reference at float32's tolerance; the rounding itself is checked tensor by tensor
    when the written weights are read back."""
    changed = sorted(set(plan.updates) | set(plan.replaced))

    def patch(model: Any) -> str:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in changed:
                param = params.get(plan.model_names.get(name, name))
                if param is None:
                    raise Unsupported(f"the merged model has no parameter {name!r} to check it by", path=base.path,
                                      hint="merge with --no-verify")
                param.copy_(merged_tensor(base, plan, name, rounded=False))
        return "merged tensors at float32, before their rounding"

    return patch


# --- inspect ------------------------------------------------------------------------------------------------


def summary(path: Path) -> dict[str, Any]:
    """What ``inspect`` shows of an adapter folder: base, rank, alpha, targets, dropout, modules saved in full,
    parameters and size."""
    from llmconv.formats.peft import FORMAT

    with FORMAT.open(path) as src:
        config = src.details["adapter_config"]
        lora = sum(i.numel for n, i in src.infos.items() if ".lora_" in n)
        full = {n: i for n, i in src.infos.items() if ".lora_" not in n}
        modules = sorted({n[len(PREFIX):].rsplit(".lora_", 1)[0] for n in src.infos if ".lora_" in n})
        by_dtype = sorted({dtype_name(i.dtype) for i in src.infos.values()})
        out = {
            "peft_type": config.get("peft_type"), "task_type": config.get("task_type"),
            "base_model": config.get("base_model_name_or_path"), "r": config.get("r"),
            "lora_alpha": config.get("lora_alpha"), "use_rslora": bool(config.get("use_rslora")),
            "use_dora": bool(config.get("use_dora")), "target_modules": config.get("target_modules"),
            "lora_dropout": config.get("lora_dropout"), "modules_to_save": config.get("modules_to_save"),
            "rank_pattern": config.get("rank_pattern") or {}, "alpha_pattern": config.get("alpha_pattern") or {},
            "fan_in_fan_out": bool(config.get("fan_in_fan_out")), "peft_version": config.get("peft_version"),
            "lora_modules": len(modules), "lora_parameters": lora,
            "saved_in_full": sorted(full), "saved_in_full_parameters": sum(i.numel for i in full.values()),
            "parameters": src.num_parameters, "bytes": src.total_bytes, "size": human_size(src.total_bytes),
            "dtypes": by_dtype,
        }
        r, alpha = config.get("r"), config.get("lora_alpha")
        if isinstance(r, int) and r > 0 and isinstance(alpha, int | float):
            out["scale"] = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return out


# --- the unmerged reference ---------------------------------------------------------------------------------


def peft_version() -> str | None:
    """PEFT's version when it is installed, else None."""
    try:
        import peft
    except ImportError:
        return None
    return getattr(peft, "__version__", "?")


def reference_label(runtime: str) -> str:
    """What runs the unmerged reference (``peft`` or ``llmconv``), as the reports say it."""
    if runtime == "peft":
        return f"PEFT {peft_version()} (PeftModel, adapters unmerged)"
    return "llmconv's LoRA forward (adapters unmerged)"


def encoder_decoder_refused(path: Path) -> Unsupported:
    """The error for verifying a merge into an encoder-decoder, which the seq2seq verifier cannot run with adapters."""
    return Unsupported("llmconv verifies a merged adapter on decoder-only and encoder models; this base is an "
                       "encoder-decoder", path=path, hint="merge it with --no-verify, and compare the result with "
                                                          "PEFT's unmerged model yourself")


def attach(model: Any, adapters: list[Adapter], *, runtime: str) -> tuple[Any, str]:
    """Put ``adapters`` on a loaded base ``model``, unmerged: each LoRA update computed at run time.

    Args:
        model: the base, a transformers model in float32.
        adapters: the adapters, with their weights.
        runtime: ``peft`` (PEFT's own ``PeftModel``, adapters as PEFT loads them) or ``llmconv`` (forward hooks
            adding ``x @ A.T @ B.T * scale * weight`` to each changed module, and the replaced tensors swapped in).
    Returns:
        The model to run and a label saying which ran.
    """
    if runtime == "peft":
        return _attach_peft(model, adapters)
    return _attach_own(model, adapters)


def _attach_peft(model: Any, adapters: list[Adapter]) -> tuple[Any, str]:
    import peft

    from llmconv.export._quiet import quiet
    from llmconv.formats.hf import linked_view

    names = [f"adapter{i}" for i in range(len(adapters))]
    with quiet():
        for i, (ad, name) in enumerate(zip(adapters, names, strict=True)):
            # Loaded from a view of its two files: PEFT reads nothing else of the folder.
            files = {"adapter_config.json": ad.path / "adapter_config.json"}
            files.update({f.name: f for f in ad.source.files})
            with linked_view(files) as view:
                if i == 0:
                    model = peft.PeftModel.from_pretrained(model, str(view), adapter_name=name, is_trainable=False,
                                                           autocast_adapter_dtype=False)
                else:
                    model.load_adapter(str(view), adapter_name=name, is_trainable=False,
                                       autocast_adapter_dtype=False)
        if len(names) > 1:
            model.base_model.set_adapter(names)
        for ad, name in zip(adapters, names, strict=True):
            if ad.weight != 1.0:
                for module in model.modules():
                    scaling = getattr(module, "scaling", None)
                    if isinstance(scaling, dict) and name in scaling:
                        scaling[name] *= ad.weight
    model.eval()
    return model, reference_label("peft")


def _attach_own(model: Any, adapters: list[Adapter]) -> tuple[Any, str]:
    import torch.nn.functional as F  # noqa: N812

    params = dict(model.named_parameters())
    for ad in adapters:
        for target, name in ad.replaced.items():
            with torch.no_grad():
                params[target].copy_(ad.source.tensor(name).to(torch.float32))
        for module, lm in ad.modules.items():
            layer = model.get_submodule(module)
            a = ad.source.tensor(lm.a).to(torch.float32).clone()
            b = ad.source.tensor(lm.b).to(torch.float32).clone()
            scale = lm.scale * ad.weight
            if lm.embedding:
                def hook(mod: Any, args: tuple, output: Any, a: Any = a, b: Any = b, scale: float = scale) -> Any:
                    after_a = F.embedding(args[0], a.T, padding_idx=mod.padding_idx)
                    return output + (after_a @ b.T) * scale
            else:
                def hook(mod: Any, args: tuple, output: Any, a: Any = a, b: Any = b, scale: float = scale) -> Any:
                    return output + F.linear(F.linear(args[0].to(a.dtype), a), b) * scale
            layer.register_forward_hook(hook)
    return model, reference_label("llmconv")
