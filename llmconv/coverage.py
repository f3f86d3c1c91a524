"""The models llmconv's test suite exports to ONNX and verifies: one architecture x task pair per entry.

``tests/test_coverage.py`` is parametrized over :data:`MODELS`: each pair's tiny seeded model (built by
``fixtures/make_fixtures.py`` from the transformers config class) is exported with ``llmconv convert --to onnx``
for the task, and the export is verified in outputs mode against PyTorch (fp32 profile); a pair is listed here
only while its test passes, so ``llmconv formats --models`` says what was tried, not what might work.
:data:`REFUSED` lists the pairs a test shows failing honestly (the export is refused, nothing written).
Kept free of heavy imports: the CLI lists it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# What outputs mode compares for each family, in words (see llmconv.verification).
CHECKS = {
    "decoder": "logits and the cache of a forward pass; prefill, cached decode steps, cache, consistency; greedy "
               "generation",
    "encoder": "last_hidden_state (every position)",
    "encoder-decoder": "encoder last_hidden_state; decoder logits; cached decode steps, self- and cross-attention "
                       "caches, consistency; greedy generation",
    "vision": "logits (top-1 over classes) or last_hidden_state, on synthetic pixel_values normalised as the "
              "model's image processor does",
}


@dataclass(frozen=True)
class ModelCase:
    """One architecture x task pair.

    Attributes:
        model_type: config.json's ``model_type``.
        architecture: the transformers class the tiny model is saved as.
        task: the task exported, as optimum names it.
        family: ``decoder``, ``encoder``, ``encoder-decoder`` or ``vision``.
        fixture: the fixture builder's name (``fixtures/make_fixtures.py``).
        exporter: ``optimum`` or ``torch.onnx`` (the fallback for model types optimum does not know).
    """

    model_type: str
    architecture: str
    task: str
    family: str
    fixture: str
    exporter: str = "optimum"

    @property
    def id(self) -> str:
        return f"{self.model_type}:{self.task}"

    def to_json(self) -> dict[str, Any]:
        return {"model_type": self.model_type, "architecture": self.architecture, "task": self.task,
                "family": self.family, "exporter": self.exporter, "checks": CHECKS[self.family]}


def _decoder(model_type: str, architecture: str, fixture: str | None = None, exporter: str = "optimum") -> ModelCase:
    task = "text-generation-with-past" if exporter == "optimum" else "text-generation"
    return ModelCase(model_type, architecture, task, "decoder", fixture or f"{model_type}-hf", exporter)


def _encoder(model_type: str, architecture: str, fixture: str | None = None) -> ModelCase:
    return ModelCase(model_type, architecture, "feature-extraction", "encoder", fixture or f"{model_type}-hf")


def _vision(model_type: str, architecture: str, task: str) -> ModelCase:
    return ModelCase(model_type, architecture, task, "vision", f"{model_type}-hf")


def _seq2seq(model_type: str, architecture: str, fixture: str) -> ModelCase:
    return ModelCase(model_type, architecture, "text2text-generation-with-past", "encoder-decoder", fixture)


MODELS: tuple[ModelCase, ...] = (
    _decoder("gpt2", "GPT2LMHeadModel"),
    _decoder("llama", "LlamaForCausalLM"),
    _decoder("mistral", "MistralForCausalLM"),
    _decoder("qwen2", "Qwen2ForCausalLM"),
    _decoder("qwen3", "Qwen3ForCausalLM"),
    _decoder("phi3", "Phi3ForCausalLM"),
    _decoder("phi", "PhiForCausalLM"),
    _decoder("gemma", "GemmaForCausalLM"),
    _decoder("gemma2", "Gemma2ForCausalLM"),
    _decoder("gemma3_text", "Gemma3ForCausalLM"),
    _decoder("gpt_neox", "GPTNeoXForCausalLM"),
    _decoder("gptj", "GPTJForCausalLM"),
    _decoder("codegen", "CodeGenForCausalLM"),
    _decoder("opt", "OPTForCausalLM"),
    _decoder("bloom", "BloomForCausalLM"),
    _decoder("falcon", "FalconForCausalLM"),
    _decoder("stablelm", "StableLmForCausalLM"),
    _decoder("granite", "GraniteForCausalLM"),
    _decoder("olmo", "OlmoForCausalLM"),
    _decoder("olmo2", "Olmo2ForCausalLM"),
    _decoder("cohere", "CohereForCausalLM"),
    _decoder("starcoder2", "Starcoder2ForCausalLM", exporter="torch.onnx"),
    _encoder("bert", "BertModel"),
    _encoder("distilbert", "DistilBertModel"),
    _encoder("albert", "AlbertModel"),
    _encoder("electra", "ElectraModel"),
    _encoder("deberta-v2", "DebertaV2Model", "deberta_v2-hf"),
    _encoder("roberta", "RobertaModel"),
    _encoder("xlm-roberta", "XLMRobertaModel"),
    _seq2seq("t5", "T5ForConditionalGeneration", "t5-hf"),
    _seq2seq("mt5", "MT5ForConditionalGeneration", "mt5-hf"),
    _seq2seq("bart", "BartForConditionalGeneration", "bart-hf"),
    _seq2seq("mbart", "MBartForConditionalGeneration", "mbart-hf"),
    _seq2seq("marian", "MarianMTModel", "marian-hf"),
    _vision("vit", "ViTForImageClassification", "image-classification"),
    _vision("vit", "ViTForImageClassification", "feature-extraction"),
    _vision("resnet", "ResNetForImageClassification", "image-classification"),
    _vision("resnet", "ResNetForImageClassification", "feature-extraction"),
)

# Pairs a test shows refused, with why: the export fails, says so, and writes nothing.
REFUSED: tuple[tuple[ModelCase, str], ...] = (
    (_decoder("mixtral", "MixtralForCausalLM", exporter="torch.onnx"),
     "optimum does not export it; torch.onnx bakes the expert routing of its trace into Split sizes, and the graph "
     "fails in onnxruntime at batch 1 (the export's verification: exit 1, nothing written)"),
    (_decoder("qwen2_moe", "Qwen2MoeForCausalLM", "qwen2moe-hf", exporter="torch.onnx"),
     "as Mixtral: the traced expert routing fails in onnxruntime (exit 1, nothing written)"),
)


def models_json() -> dict[str, Any]:
    """``llmconv formats --models --json``: the pairs tested, and the ones refused with why."""
    return {"schema": "llmconv.models/1", "ok": True, "checks": CHECKS,
            "models": [m.to_json() for m in MODELS],
            "refused": [{**m.to_json(), "why": why} for m, why in REFUSED]}


def markdown() -> str:
    """The matrix as the README shows it (a test keeps the README's copy equal to this)."""
    lines = ["| family | model_type | architecture | task | exporter |", "| --- | --- | --- | --- | --- |"]
    for m in MODELS:
        lines.append(f"| {m.family} | {m.model_type} | {m.architecture} | {m.task} | {m.exporter} |")
    for m, why in REFUSED:
        lines.append(f"| refused | {m.model_type} | {m.architecture} | {m.task} | {why} |")
    return "\n".join(lines)
