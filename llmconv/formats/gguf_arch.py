"""What llama.cpp expects of a GGUF model, per architecture: tensor names, hyper-parameter keys, tensor layout.

The facts are llama.cpp's (its ``convert_hf_to_gguf.py``); the names come from the gguf package's own
``TensorNameMap``, so they follow the package's release. Supported: Llama and Mistral (written as ``llama``,
Q/K rows permuted), Qwen2, Qwen3 and GPT-2 (Conv1D weights transposed to rows of outputs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from llmconv.errors import Unsupported

# A hyper-parameter: (GGUF key under "<arch>.", GGUFWriter method, how to read it from config.json).
Param = tuple[str, str, Callable[[dict[str, Any]], Any]]


def _get(*keys: str, default: Any = None) -> Callable[[dict[str, Any]], Any]:
    def read(config: dict[str, Any]) -> Any:
        for k in keys:
            if config.get(k) is not None:
                return config[k]
        return default
    return read


def _head_dim(config: dict[str, Any]) -> int:
    if config.get("head_dim"):
        return int(config["head_dim"])
    return int(config["hidden_size"]) // int(config["num_attention_heads"])


def _kv_heads(config: dict[str, Any]) -> int:
    return int(config.get("num_key_value_heads") or config["num_attention_heads"])


_DECODER: list[Param] = [
    ("context_length", "add_context_length", _get("max_position_embeddings")),
    ("embedding_length", "add_embedding_length", _get("hidden_size")),
    ("block_count", "add_block_count", _get("num_hidden_layers")),
    ("feed_forward_length", "add_feed_forward_length", _get("intermediate_size")),
    ("attention.head_count", "add_head_count", _get("num_attention_heads")),
    ("attention.head_count_kv", "add_head_count_kv", _kv_heads),
    ("rope.freq_base", "add_rope_freq_base", _get("rope_theta", default=10000.0)),
    ("attention.layer_norm_rms_epsilon", "add_layer_norm_rms_eps", _get("rms_norm_eps")),
]
_GPT2: list[Param] = [
    ("block_count", "add_block_count", _get("n_layer")),
    ("context_length", "add_context_length", _get("n_positions", "n_ctx")),
    ("embedding_length", "add_embedding_length", _get("n_embd")),
    ("feed_forward_length", "add_feed_forward_length", lambda c: c.get("n_inner") or 4 * int(c["n_embd"])),
    ("attention.head_count", "add_head_count", _get("n_head")),
    ("attention.layer_norm_epsilon", "add_layer_norm_eps", _get("layer_norm_epsilon")),
]


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: each head's rows from rotate-half order (HF) to interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`_permute` (transformers' ``_reverse_permute_weights``)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class Arch:
    """One architecture: the GGUF ``general.architecture`` and how its checkpoint maps to llama.cpp's layout."""

    gguf: str                      # general.architecture
    params: list[Param]
    permute_qk: bool = False       # Llama's rotary layout (Q/K rows interleaved per head)
    transpose: tuple[str, ...] = ()  # GGUF names (suffixes) stored transposed in the checkpoint (GPT-2's Conv1D)
    rope_dim: bool = False         # write rope.dimension_count (head size)
    head_keys: bool = False        # write attention.key_length / value_length

    def hf_to_gguf(self, gguf_name: str, t: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
        """The checkpoint tensor ``t`` in the layout GGUF stores under ``gguf_name``."""
        return self._layout(gguf_name, t, config, _permute)

    def gguf_to_hf(self, gguf_name: str, t: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
        """The inverse of :meth:`hf_to_gguf`."""
        return self._layout(gguf_name, t, config, _unpermute)

    def changes_layout(self, gguf_name: str) -> bool:
        return (self.permute_qk and _qk(gguf_name) is not None) or (bool(self.transpose)
                                                                    and gguf_name.endswith(self.transpose))

    def transposes(self, gguf_name: str, ndim: int) -> bool:
        """Whether the checkpoint stores ``gguf_name`` transposed (GPT-2's Conv1D: (in, out))."""
        return bool(self.transpose) and ndim == 2 and gguf_name.endswith(self.transpose)

    def _layout(self, gguf_name: str, t: torch.Tensor, config: dict[str, Any],
                permute: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
        if self.permute_qk:
            which = _qk(gguf_name)
            if which is not None:
                heads = int(config["num_attention_heads"]) if which == "q" else _kv_heads(config)
                return permute(t, heads).contiguous()
        if self.transposes(gguf_name, t.dim()):
            return t.t().contiguous()
        return t


def _qk(gguf_name: str) -> str | None:
    if gguf_name.endswith((".attn_q.weight", ".attn_q.bias")):
        return "q"
    if gguf_name.endswith((".attn_k.weight", ".attn_k.bias")):
        return "k"
    return None


# The checkpoint's class (config.json "architectures") -> its GGUF layout.
ARCHS: dict[str, Arch] = {
    "LlamaForCausalLM": Arch("llama", _DECODER, permute_qk=True, rope_dim=True),
    "MistralForCausalLM": Arch("llama", _DECODER, permute_qk=True, rope_dim=True),
    "Qwen2ForCausalLM": Arch("qwen2", _DECODER),
    "Qwen3ForCausalLM": Arch("qwen3", _DECODER, head_keys=True),
    "GPT2LMHeadModel": Arch("gpt2", _GPT2, transpose=(".attn_qkv.weight", ".attn_output.weight", ".ffn_up.weight",
                                                      ".ffn_down.weight")),
}
# general.architecture -> the class a GGUF of it is read back as.
READ_BACK = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
             "gpt2": "GPT2LMHeadModel"}


def arch_for(config: dict[str, Any] | None, *, path: Any = None) -> tuple[str, Arch]:
    """The checkpoint's class and its GGUF layout.

    Raises:
        Unsupported: no config, or an architecture llmconv does not write as GGUF.
    """
    if config is None:
        raise Unsupported("a GGUF file needs the model's architecture and hyper-parameters, and this checkpoint has "
                          "no config.json", path=path,
                          hint="convert the Hugging Face folder (config.json + weights), not a bare weights file")
    names = config.get("architectures") or []
    cls = names[0] if names else None
    if cls not in ARCHS:
        known = ", ".join(sorted(ARCHS))
        raise Unsupported(f"llmconv does not write {cls or config.get('model_type') or 'this architecture'} as GGUF",
                          path=path, hint=f"GGUF conversion supports {known}")
    if config.get("attention_bias") and ARCHS[cls].permute_qk:
        raise Unsupported("a Llama with attention biases (attention_bias: true) is not written to GGUF by llmconv: "
                          "transformers' GGUF loader does not read them back, so the file could not be verified",
                          path=path, hint="use llama.cpp's convert_hf_to_gguf.py")
    scaling = config.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type")
        raise Unsupported(f"rope_scaling {kind!r} is not written to GGUF by llmconv", path=path,
                          hint="use llama.cpp's convert_hf_to_gguf.py for rope-scaled models")
    return cls, ARCHS[cls]


def hyper_parameters(arch: Arch, config: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """``(key, writer method, value)`` for each ``<arch>.*`` hyper-parameter of ``config``."""
    out = []
    for key, method, read in arch.params:
        value = read(config)
        if value is not None:
            out.append((key, method, value))
    if arch.rope_dim:
        out.append(("rope.dimension_count", "add_rope_dimension_count", _head_dim(config)))
    if arch.head_keys or config.get("head_dim"):
        # llama.cpp's converter writes them whenever the config names a head size: without them llama.cpp takes
        # hidden / heads, and refuses a Llama whose rope.dimension_count differs ("invalid n_rot").
        out.append(("attention.key_length", "add_key_length", _head_dim(config)))
        out.append(("attention.value_length", "add_value_length", _head_dim(config)))
    return out


def loader_overrides(meta: dict[str, Any]) -> dict[str, Any]:
    """Config values transformers' GGUF loader (4.57) reads under names its config class ignores, given under the
    class's own: Qwen3's head size is not read (``attention.key_length``), and GPT-2's ``context_length`` becomes
    ``n_ctx`` and ``feed_forward_length`` an attribute of that name, so a GPT-2 with other than 1024 positions or a
    4x feed-forward would load with the wrong shapes."""
    arch = meta.get("general.architecture")
    if arch == "qwen3" and meta.get("qwen3.attention.key_length") is not None:
        return {"head_dim": int(meta["qwen3.attention.key_length"])}  # its qwen3 table maps no head size
    if arch != "gpt2":
        return {}
    out = {}
    if meta.get("gpt2.context_length") is not None:
        out["n_positions"] = int(meta["gpt2.context_length"])
    if meta.get("gpt2.feed_forward_length") is not None:
        out["n_inner"] = int(meta["gpt2.feed_forward_length"])
    return out
