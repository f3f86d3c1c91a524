"""llmconv.architecture: tied groups, embeddings and heads read from the model class on the meta device,
and the fallbacks where the class cannot be read."""

from __future__ import annotations

import json
import os
import time

import pytest

from llmconv import architecture
from llmconv.architecture import describe, unavailable_reason


def _config(fx, name: str) -> dict:
    return json.loads((fx(name) / "config.json").read_text())


def test_bart_ties_four_names_and_keeps_the_shared_embedding(fx):
    arch = describe(_config(fx, "bart-hf"))
    assert arch is not None and arch.model_class == "BartForConditionalGeneration" and arch.prefix == "model"
    group = {"model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
             "lm_head.weight"}
    assert [set(g) for g in arch.tied] == [group]
    assert arch.kept(group) == "model.shared.weight"  # what save_pretrained(safe_serialization=True) stores
    assert arch.ties("lm_head.weight", "model.shared.weight")
    assert not arch.ties("model.encoder.embed_positions.weight", "model.shared.weight")
    # A checkpoint of the base model (BartModel) spells the names without the prefix.
    assert arch.own_name("shared.weight") == "model.shared.weight"
    assert arch.ties("encoder.embed_tokens.weight", "shared.weight")
    assert arch.embedding_of("model.encoder.embed_positions.weight").startswith("BartLearnedPositionalEmbedding")
    assert arch.embedding_of("model.encoder.layers.0.fc1.weight") is None
    assert arch.head_of("lm_head.weight") == "the model's output embedding (Linear)"


def test_t5_relative_attention_bias_is_an_embedding(fx):
    arch = describe(_config(fx, "t5-hf"))
    assert arch.embedding_of("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight") == \
        "Embedding (an nn.Embedding)"
    assert arch.kept(["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                      "lm_head.weight"]) == "shared.weight"
    assert "lm_head.weight" in arch.heads


def test_an_untied_head_stays_apart(fx):
    mt5 = describe(_config(fx, "mt5-hf"))  # tie_word_embeddings false: only the embed_tokens share
    assert [sorted(g) for g in mt5.tied] == [["decoder.embed_tokens.weight", "encoder.embed_tokens.weight",
                                              "shared.weight"]]
    assert not mt5.ties("lm_head.weight", "shared.weight") and mt5.head_of("lm_head.weight") is not None
    llama = describe(_config(fx, "llama-hf"))
    assert llama.tied == () and not llama.ties("lm_head.weight", "model.embed_tokens.weight")


@pytest.mark.parametrize(("config", "reason"), [
    (None, "no config.json"),
    ({"architectures": ["LlamaForCausalLM"]}, "config.json names no model_type"),
    ({"model_type": "no-such-model"}, "does not know model_type 'no-such-model'"),
    ({"model_type": "evil", "auto_map": {"AutoModel": "evil.EvilModel"}}, "llmconv never runs code from a model"),
    ({"model_type": "gpt2", "n_embd": 7, "n_head": 2}, "GPT2Model cannot be built from config.json (ValueError"),
    ({"model_type": "gpt2", "n_layer": 1_000_000}, "asks for 1000000 of 'n_layer', more than the 4096"),
])
def test_fallbacks_say_why(config, reason):
    assert describe(config) is None
    assert reason in unavailable_reason(config)


def test_an_architectures_entry_transformers_lacks_falls_back_to_the_auto_class():
    arch = describe({"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "architectures": ["Mystery"]})
    assert arch.model_class == "GPT2Model"


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_7b_config_is_built_on_the_meta_device_cheaply():
    import transformers

    config = json.loads(json.dumps(transformers.LlamaConfig(architectures=["LlamaForCausalLM"]).to_dict()))
    describe({"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
              "num_attention_heads": 2})  # the class's import, paid once per process, not measured
    before, t0 = _rss(), time.perf_counter()
    arch = describe(config)
    seconds, grown = time.perf_counter() - t0, _rss() - before
    assert arch.model_class == "LlamaForCausalLM" and len(arch.parameters) == 291
    assert grown < 200 * 2**20, grown  # 6.7 B float32 weights would be 27 GB
    assert seconds < 10, seconds  # about 0.1 s here
    t0 = time.perf_counter()
    assert describe(dict(config)) is arch  # cached on the JSON text
    assert time.perf_counter() - t0 < 0.05
    assert architecture._from_json.cache_info().hits >= 1
