"""Encoder-decoders (T5, BART, Marian, mT5, mBART): both graphs verified the way ``generate()`` runs them.

An encoder-decoder is two graphs in optimum's layout: ``encoder_model.onnx`` (token ids -> hidden states)
and a decoder with its cache: ``decoder_model_merged.onnx`` (one graph, ``use_cache_branch`` picks the first
step or a cached one), or ``decoder_model.onnx`` + ``decoder_with_past_model.onnx``, or ``decoder_model.onnx``
alone (no cache: the whole decoded sequence runs again at every step, as ``ORTModelForSeq2SeqLM`` does with
``use_cache=False``). A Hugging Face folder runs in PyTorch (``AutoModelForSeq2SeqLM``).

Each side runs its own encoder on the prompts (right-padded, as the tokenizers of these models pad) and feeds
its own hidden states to its own decoder, so what is compared is what a user's pipeline gives:

- ``encoder.last_hidden_state``: the encoder on the synthetic (or ``--inputs``) batches;
- ``logits``: the decoder without a cache on the same batches, decoder ids starting with the start token;
- ``decode.prefill``/``decode.steps``/``decode.consistency``/``decode.cache``/``generation``: the cached
  decode loop of :mod:`llmconv.verification.decode`, from the decoder start token, teacher-forced on the
  reference's greedy tokens, the decoder's self-attention cache compared at every layer;
- ``decode.cross_cache``: the cross-attention keys and values each decoder layer computed from the encoder's
  output, at the prompts' real positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmconv import progress as status
from llmconv.errors import GraphRunError, InputError, Unsupported, UsageError
from llmconv.formats.onnx import SEQ2SEQ_DECODERS, SEQ2SEQ_ENCODER, is_seq2seq_folder
from llmconv.verification.decode import DecodePlan
from llmconv.verification.report import Check, VerifyReport

ENCODER = SEQ2SEQ_ENCODER
DECODER_MERGED, DECODER, DECODER_WITH_PAST = SEQ2SEQ_DECODERS
GRAPH_FILES = (ENCODER, *SEQ2SEQ_DECODERS)


def applies(*paths: Path) -> bool:
    """Whether any of ``paths`` is an encoder-decoder: an ONNX folder in optimum's layout, or a Hugging Face folder
    whose config.json names a sequence-to-sequence architecture."""
    from llmconv.export.tasks import is_seq2seq, task_from_config

    for p in map(Path, paths):
        if is_seq2seq_folder(p) or _partial(p) or (p.is_file() and p.name in GRAPH_FILES
                                                   and is_seq2seq_folder(p.parent)):
            return True
        if p.is_dir() and (p / "config.json").is_file() and not any(p.glob("*.onnx")):
            from llmconv.checkpoint import read_json

            config = read_json(p / "config.json", what="config.json")
            if isinstance(config, dict) and is_seq2seq(task_from_config(config)):
                return True
    return False


@dataclass
class Seq2SeqSig:
    """One side of an encoder-decoder comparison, read from its files.

    Attributes:
        path: the path as given.
        kind: ``onnxruntime`` or ``torch``.
        config: config.json.
        graphs: for ONNX, the runners.Signature of each graph file present (by file name).
        base: for a Hugging Face folder, its runners.Signature.
        start_id: the decoder's first token (``decoder_start_token_id``).
        notes: what the reader noticed.
    """

    path: Path
    kind: str
    config: dict[str, Any]
    graphs: dict[str, Any] = field(default_factory=dict)
    base: Any = None
    start_id: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def vocab_size(self) -> int | None:
        v = self.config.get("vocab_size")
        if isinstance(v, int) and v > 0:
            return v
        for g in self.graphs.values():
            if g.vocab_size:
                return int(g.vocab_size)
        return None

    @property
    def max_positions(self) -> int | None:
        v = self.config.get("max_position_embeddings")
        return v if isinstance(v, int) and v > 0 else None  # T5's relative positions have no limit

    @property
    def pad_token_id(self) -> int | None:
        v = self.config.get("pad_token_id")
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None

    @property
    def float_dtype(self) -> str | None:
        if self.base is not None:
            return self.base.float_dtype
        dtypes = [g.float_dtype for g in self.graphs.values() if g.float_dtype]
        return max(set(dtypes), key=dtypes.count) if dtypes else None

    @property
    def quantization(self) -> str | None:
        found = {g.quantization for g in self.graphs.values() if g.quantization}
        return "int4" if "int4" in found else "int8" if "int8" in found else None

    @property
    def tokenizer_dir(self) -> Path | None:
        if self.base is not None:
            return self.base.tokenizer_dir
        return next((g.tokenizer_dir for g in self.graphs.values() if g.tokenizer_dir), None)

    def describe_graphs(self) -> str:
        return ", ".join(self.graphs) if self.graphs else "PyTorch"


def _start_id(config: dict[str, Any], folder: Path) -> int:
    """``decoder_start_token_id`` from config.json, else generation_config.json, else the pad id (T5's rule)."""
    from llmconv.checkpoint import read_json

    sources = [config]
    gen = folder / "generation_config.json"
    if gen.is_file():
        parsed = read_json(gen, what="generation_config.json")
        if isinstance(parsed, dict):
            sources.append(parsed)
    for key in ("decoder_start_token_id", "pad_token_id"):
        for src in sources:
            v = src.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                return v
    raise UsageError("config.json names no decoder_start_token_id (nor pad_token_id): the decoder's first token "
                     "is unknown", path=folder / "config.json", hint="add decoder_start_token_id to config.json")


def describe(path: Path) -> Seq2SeqSig:
    """Read one side of an encoder-decoder comparison from its files (no weights are loaded).

    Args:
        path: an ONNX folder in optimum's layout, or a Hugging Face folder of a sequence-to-sequence model.
    Returns:
        A Seq2SeqSig.
    Raises:
        UsageError: the path is not an encoder-decoder, or its decoder graphs do not fit together.
    Example:
        >>> describe(Path("t5-onnx")).graphs.keys()
        dict_keys(['encoder_model.onnx', 'decoder_model_merged.onnx'])
    """
    from llmconv.checkpoint import read_json
    from llmconv.export.tasks import is_seq2seq
    from llmconv.verification import runners

    path = Path(path)
    missing = _partial(path)
    if missing:
        raise UsageError(f"an encoder-decoder folder without its {missing}: it holds "
                         f"{', '.join(sorted(p.name for p in path.glob('*.onnx')))}", path=path,
                         hint="export it again with llmconv convert --to onnx, or copy the missing graph back")
    if is_seq2seq_folder(path):
        graphs = {n: runners.describe(path / n) for n in GRAPH_FILES if (path / n).is_file()}
        if DECODER_MERGED in graphs:  # the unmerged pair, when also there, is what the merged graph holds
            graphs = {n: g for n, g in graphs.items() if n in (ENCODER, DECODER_MERGED)}
        elif DECODER not in graphs:
            raise UsageError(f"the folder has {DECODER_WITH_PAST} but no {DECODER} for the first decoder step",
                             path=path, hint="export it again with llmconv convert --to onnx")
        config_path = path / "config.json"
        if not config_path.is_file():
            raise UsageError("an encoder-decoder folder needs its config.json (the decoder's start token, its "
                             "vocabulary)", path=path, hint="copy the model's config.json into the folder")
        config = read_json(config_path, what="config.json")
        if not isinstance(config, dict):
            raise UsageError("config.json holds no object", path=config_path)
        notes = list(dict.fromkeys(n for g in graphs.values() for n in g.notes))
        return Seq2SeqSig(path=path, kind="onnxruntime", config=config, graphs=graphs,
                          start_id=_start_id(config, path), notes=notes)
    if path.is_file() and path.suffix.lower() == ".onnx":
        raise UsageError("this is one graph of an encoder-decoder; the model is the folder that holds its encoder "
                         f"({ENCODER}) and decoder ({DECODER_MERGED})", path=path, hint="give the folder")
    base = runners.describe(path)
    if base.kind != "torch" or not is_seq2seq(base.task or ""):
        what = base.task or "a graph of unknown task"
        raise UsageError(f"the other model is an encoder-decoder and this one is not ({what})", path=path,
                         hint="compare an encoder-decoder with its own export (a folder with "
                              f"{ENCODER} and {DECODER_MERGED}) or another Hugging Face folder of it")
    return Seq2SeqSig(path=path, kind="torch", config=base.config or {}, base=base,
                      start_id=_start_id(base.config or {}, path), notes=list(base.notes))


def _partial(path: Path) -> str | None:
    """What an ONNX folder that holds part of an encoder-decoder (its graph names) lacks; None for any other path."""
    if not path.is_dir() or is_seq2seq_folder(path):
        return None
    if (path / ENCODER).is_file():
        return f"decoder ({DECODER_MERGED} or {DECODER})"
    # Decoder graphs alone are also what optimum once wrote for causal LMs: only the config says it is half a model.
    if any((path / n).is_file() for n in GRAPH_FILES[1:]) and (path / "config.json").is_file():
        from llmconv.checkpoint import read_json
        from llmconv.export.tasks import is_seq2seq, task_from_config

        config = read_json(path / "config.json", what="config.json")
        if isinstance(config, dict) and is_seq2seq(task_from_config(config)):
            return f"encoder ({ENCODER})"
    return None


# ---- runners ----------------------------------------------------------------------------------------


class _OrtSeq2Seq:
    """The encoder and decoder graphs of an ONNX folder, each in its own onnxruntime session."""

    kind = "onnxruntime"

    def __init__(self, sig: Seq2SeqSig, *, provider: str) -> None:
        from llmconv.verification.runners import ort_session

        self.sig = sig
        self.sessions: dict[str, Any] = {}
        for name in sig.graphs:
            self.sessions[name] = ort_session(sig.path / name, path=sig.path / name, provider=provider)
        self.provider = self.sessions[ENCODER].get_providers()[0]
        self.label = f"onnxruntime ({self.provider}, text2text-generation: {sig.describe_graphs()})"
        self.first = DECODER_MERGED if DECODER_MERGED in self.sessions else DECODER
        self.cached = DECODER_MERGED if DECODER_MERGED in self.sessions else \
            DECODER_WITH_PAST if DECODER_WITH_PAST in self.sessions else None
        self._inputs = {n: {i.name: i for i in s.get_inputs()} for n, s in self.sessions.items()}
        self._outputs = {n: [o.name for o in s.get_outputs()] for n, s in self.sessions.items()}
        self.has_cache = self.cached is not None and any(k.startswith("past_key_values.")
                                                         for k in self._inputs[self.cached])

    def _run(self, name: str, feed: dict[str, Any], names: list[str]) -> dict[str, np.ndarray]:
        from llmconv.verification.runners import run_session

        return run_session(self.sessions[name], feed, names, path=self.sig.path / name)

    def encode(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        takes = self._inputs[ENCODER]
        feed = {"input_ids": ids, "attention_mask": mask}
        return self._run(ENCODER, {k: v for k, v in feed.items() if k in takes}, ["last_hidden_state"])[
            "last_hidden_state"]

    def decode(self, ids: np.ndarray, hidden: np.ndarray, enc_mask: np.ndarray,
               past: dict[str, np.ndarray] | None) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        """Logits for ``ids`` and the past to feed next (None for a decoder without a cache)."""
        name = self.first if past is None or self.cached is None else self.cached
        takes = self._inputs[name]
        feed: dict[str, Any] = {"input_ids": ids, "encoder_hidden_states": hidden, "encoder_attention_mask": enc_mask}
        if "use_cache_branch" in takes:
            feed["use_cache_branch"] = np.array([past is not None])
        past_names = [k for k in takes if k.startswith("past_key_values.")]
        for k in past_names:
            if past is not None and k in past:
                feed[k] = past[k]
            else:  # the first step of a merged decoder: an empty past, as ORTModelForSeq2SeqLM gives it
                dims = takes[k].shape
                heads = dims[1] if isinstance(dims[1], int) else self._heads()
                head_dim = dims[3] if isinstance(dims[3], int) else self._head_dim()
                feed[k] = np.zeros((ids.shape[0], heads, 0, head_dim), dtype=np.float16
                                   if "float16" in takes[k].type else np.float32)
        feed = {k: v for k, v in feed.items() if k in takes}
        presents = [o for o in self._outputs[name] if o.startswith("present.")]
        out = self._run(name, feed, ["logits", *presents])
        if not self.has_cache:
            return out["logits"], None
        nxt: dict[str, np.ndarray] = {}
        for p in presents:
            k = p.replace("present.", "past_key_values.", 1)
            # Cross-attention keys/values are computed once, at the first step; later steps pass them on.
            nxt[k] = past[k] if past is not None and ".encoder." in k and k in past else out[p]
        if past is not None:
            for k, v in past.items():
                nxt.setdefault(k, v)
        return out["logits"], nxt

    def _heads(self) -> int:
        c = self.sig.config
        v = c.get("num_heads") or c.get("decoder_attention_heads") or c.get("num_attention_heads")
        if not isinstance(v, int):
            raise UsageError("cannot tell the decoder's attention heads from config.json", path=self.sig.path)
        return v

    def _head_dim(self) -> int:
        c = self.sig.config
        v = c.get("d_kv") or ((c.get("d_model") or c.get("hidden_size") or 0) // self._heads())
        if not v:
            raise UsageError("cannot tell the decoder's head size from config.json", path=self.sig.path)
        return int(v)

    @staticmethod
    def layers(past: dict[str, np.ndarray] | None, which: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """(key, value) per layer of the ``decoder`` (self-attention) or ``encoder`` (cross-attention) cache."""
        if not past:
            return []
        n = 1 + max(int(k.split(".")[1]) for k in past)
        return [(past[f"past_key_values.{i}.{which}.key"], past[f"past_key_values.{i}.{which}.value"])
                for i in range(n) if f"past_key_values.{i}.{which}.key" in past]

    def close(self) -> None:
        self.sessions.clear()


class _TorchSeq2Seq:
    """A transformers encoder-decoder in PyTorch (float32), its encoder and decoder called as ``generate()`` does."""

    kind = "torch"
    has_cache = True

    def __init__(self, sig: Seq2SeqSig) -> None:
        from llmconv.verification.runners import TorchRunner

        self.sig = sig
        self.inner = TorchRunner(sig.base, task="text2text-generation")
        self.model = self.inner.model
        self.label = "torch (text2text-generation)"

    def encode(self, ids: np.ndarray, mask: np.ndarray) -> Any:
        import torch

        with torch.inference_mode():
            out = self.model.get_encoder()(input_ids=torch.from_numpy(np.ascontiguousarray(ids)),
                                           attention_mask=torch.from_numpy(np.ascontiguousarray(mask)),
                                           return_dict=True)
        return out.last_hidden_state

    def decode(self, ids: np.ndarray, hidden: Any, enc_mask: np.ndarray, past: Any) -> tuple[np.ndarray, Any]:
        import torch
        from transformers.modeling_outputs import BaseModelOutput

        with torch.inference_mode():
            out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
                             attention_mask=torch.from_numpy(np.ascontiguousarray(enc_mask)),
                             decoder_input_ids=torch.from_numpy(np.ascontiguousarray(ids)),
                             past_key_values=past, use_cache=True, return_dict=True)
        if out.past_key_values is None:
            raise Unsupported("the model returned no cache with use_cache=True", path=self.sig.path,
                              hint="verify with --decode-steps 0 --generate 0")
        return out.logits.float().numpy(), out.past_key_values

    @staticmethod
    def layers(cache: Any, which: str) -> list[tuple[np.ndarray, np.ndarray]]:
        from llmconv.verification.runners import _cache_layers

        if cache is None:
            return []
        part = cache.self_attention_cache if which == "decoder" else cache.cross_attention_cache
        return [(k.float().numpy(), v.float().numpy()) for k, v in _cache_layers(part)]

    def close(self) -> None:
        self.inner.close()
        del self.model


def _open(sig: Seq2SeqSig, provider: str) -> _OrtSeq2Seq | _TorchSeq2Seq:
    return _OrtSeq2Seq(sig, provider=provider) if sig.kind == "onnxruntime" else _TorchSeq2Seq(sig)


class _Stepper:
    """The decode loop's view of an encoder-decoder: the encoder runs once on the prompts, then each call is one
    decoder step through the side's own cache (``decode.run_loop`` drives it like a causal LM's)."""

    def __init__(self, runner: Any, enc_ids: np.ndarray, enc_mask: np.ndarray) -> None:
        self.runner, self.enc_ids, self.enc_mask = runner, enc_ids, enc_mask
        self.hidden: Any = None
        self.past: Any = None
        self.ids: np.ndarray | None = None

    def forward(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        if self.hidden is None:
            self.hidden = self.runner.encode(self.enc_ids, self.enc_mask)
        if not self.runner.has_cache:  # no cache: the whole decoded sequence again
            self.ids = ids if self.ids is None else np.concatenate([self.ids, ids], axis=1)
            logits, _ = self.runner.decode(self.ids, self.hidden, self.enc_mask, None)
            return logits[:, -ids.shape[1]:]
        logits, self.past = self.runner.decode(ids, self.hidden, self.enc_mask, self.past)
        return logits

    def cache(self) -> list[tuple[np.ndarray, np.ndarray]] | None:
        return self.runner.layers(self.past, "decoder") if self.runner.has_cache else None

    def cross(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return self.runner.layers(self.past, "encoder") if self.runner.has_cache else []

    def feed_past(self) -> dict[str, np.ndarray]:
        return {}


# ---- the plan ---------------------------------------------------------------------------------------


@dataclass
class Seq2SeqPlan(DecodePlan):
    """The decode plan of an encoder-decoder: the prompts feed the encoder (right-padded); the decoder starts
    from ``start_id`` in every row (``ids``/``mask`` are its one-token prompt)."""

    enc_ids: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))
    enc_mask: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))
    start_id: int = 0

    cache_label = "decoder."

    def prompt_tokens(self) -> list[int]:
        return [int(n) for n in self.enc_mask.sum(axis=1)]

    def meta(self) -> dict[str, Any]:
        lengths = self.prompt_tokens()
        return {"prompts": len(lengths), "prompt_lengths": lengths,
                "right_padded": sum(n < self.enc_mask.shape[1] for n in lengths),
                "decode_steps": self.decode_steps, "generate": self.generate, "source": self.source,
                "decoder_start_token_id": self.start_id,
                "prompt_ids": [[int(t) for t in row[m == 1]] for row, m in zip(self.enc_ids, self.enc_mask,
                                                                                strict=True)]}


def _right_padded(ids: np.ndarray, mask: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded rows moved to the right: the real tokens first, then the padding."""
    out_ids, out_mask = np.full_like(ids, pad), np.zeros_like(mask)
    for r in range(ids.shape[0]):
        real = ids[r][mask[r] == 1]
        out_ids[r, :len(real)] = real
        out_mask[r, :len(real)] = 1
    return out_ids, out_mask


def _plan(ref: Seq2SeqSig, cand: Seq2SeqSig, *, decode_steps: int, generate: int, prompts: Path | None,
          seq_len: int, seed: int) -> Seq2SeqPlan:
    from llmconv.verification.decode import prompt_plan

    plan = prompt_plan(ref, cand, decode_steps=decode_steps, generate=generate, prompts=prompts, seq_len=seq_len,
                       seed=seed)
    enc_ids, enc_mask = _right_padded(plan.ids, plan.mask, plan.pad_id)
    rows = enc_ids.shape[0]
    start = ref.start_id
    return Seq2SeqPlan(ids=np.full((rows, 1), start, dtype=np.int64), mask=np.ones((rows, 1), dtype=np.int64),
                       decode_steps=decode_steps, generate=generate, source=plan.source, pad_id=plan.pad_id,
                       enc_ids=enc_ids, enc_mask=enc_mask, start_id=start)


# ---- comparing --------------------------------------------------------------------------------------


def compare(reference: Path, candidate: Path, *, profile: str = "auto", atol: float | None = None,
            rtol: float | None = None, inputs: Path | None = None, text: Path | None = None, batch: int = 2,
            seq_len: int = 16, samples: int = 2, seed: int = 0, provider: str = "cpu",
            decode_steps: int | None = None, generate: int | None = None, prompts: Path | None = None,
            localize: bool = False, max_ppl_increase: float | None = None) -> VerifyReport:
    """Outputs mode for two encoder-decoders (see the module's docstring for the checks).

    Args: as ``outputs.compare_outputs``; ``text`` (perplexity) is for causal LMs and refused here.
    Returns:
        A VerifyReport in outputs mode.
    Raises:
        UsageError: one side is not an encoder-decoder, ``--text``, or inputs that do not fit.
    Example:
        >>> compare(Path("t5-hf"), Path("t5-onnx"), profile="fp32").passed
        True
    """
    from llmconv.verification.decode import DEFAULT_DECODE_STEPS, DEFAULT_GENERATE, decode_checks
    from llmconv.verification.inputs import InputPlan, feed_shapes, load_inputs, synthetic_inputs
    from llmconv.verification.metrics import OutputComparison
    from llmconv.verification.outputs import check_provider_pair, crash_report, crashed_in, outputs_report
    from llmconv.verification.profiles import candidate_profile

    ref_sig, cand_sig = describe(Path(reference)), describe(Path(candidate))
    if text is not None:
        raise UsageError("--text measures perplexity, which needs a causal language model; this is an "
                         "encoder-decoder", path=Path(text), hint="use --prompts FILE for real inputs")
    check_provider_pair(provider, ref_sig, cand_sig, candidate=Path(candidate))
    notes = list(dict.fromkeys([*ref_sig.notes, *cand_sig.notes]))
    prof = candidate_profile(profile, candidate=cand_sig, atol=atol, rtol=rtol, max_ppl_increase=max_ppl_increase,
                             notes=notes)
    if ref_sig.start_id != cand_sig.start_id:
        raise UsageError(f"the decoders start from different tokens ({ref_sig.start_id} vs {cand_sig.start_id})",
                         path=Path(candidate), hint="check decoder_start_token_id in both config.json files")
    vocabs = [v for v in (ref_sig.vocab_size, cand_sig.vocab_size) if v]
    if len(set(vocabs)) > 1:
        notes.append(f"vocabulary sizes differ ({vocabs[0]} vs {vocabs[1]}): token ids drawn below {min(vocabs)}")
    positions = [p for p in (ref_sig.max_positions, cand_sig.max_positions) if p]
    pads = [s.pad_token_id for s in (ref_sig, cand_sig) if s.pad_token_id is not None]
    in_plan = InputPlan(wants={"input_ids", "attention_mask"}, vocab_size=min(vocabs) if vocabs else 0,
                        max_positions=min(positions) if positions else None, pad_token_id=pads[0] if pads else None)
    if inputs is not None:
        feeds, meta = load_inputs(Path(inputs), in_plan)
    else:
        feeds = synthetic_inputs(in_plan, batch=batch, seq_len=seq_len, samples=samples, seed=seed)
        meta = {"batch": batch, "seq_len": seq_len, "samples": len(feeds), "seed": seed, "shapes": feed_shapes(feeds)}
    # The decoder's ids in the forward check: the start token, then ids drawn like the prompts'.
    rng = np.random.default_rng(seed + 1)
    dec_feeds = []
    for f in feeds:
        b, n = f["input_ids"].shape
        width = max(1, min(n, 8))
        ids = rng.integers(0, in_plan.vocab_size, size=(b, width), dtype=np.int64)
        ids[:, 0] = ref_sig.start_id
        dec_feeds.append(ids)

    k = DEFAULT_DECODE_STEPS if decode_steps is None else decode_steps
    n_gen = DEFAULT_GENERATE if generate is None else generate
    plan = None
    if k or n_gen:
        plan = _plan(ref_sig, cand_sig, decode_steps=k, generate=n_gen, prompts=prompts, seq_len=seq_len, seed=seed)
    else:
        if prompts is not None:
            raise UsageError("--prompts with --decode-steps 0 and --generate 0: nothing would use them",
                             path=Path(prompts))
        notes.append("the cached decode loop and generation were not checked (--decode-steps 0 --generate 0)")
    if localize:
        notes.append("--localize does not search encoder-decoders yet: the checks below say which graph and step "
                      "part")

    enc_cmp = OutputComparison("encoder.last_hidden_state", profile=prof, logits=False)
    dec_cmp = OutputComparison("logits", profile=prof, logits=True)
    with status.phase("reference"):
        ref_out, ref_trace, ref_cross, ref_label = _run_side(ref_sig, feeds, dec_feeds, plan, provider=provider)
    try:
        with status.phase("candidate"):
            cand_out, cand_trace, cand_cross, cand_label = _run_side(cand_sig, feeds, dec_feeds, plan,
                                                                     provider=provider, reference=ref_trace)
    except GraphRunError as e:
        if not crashed_in(e, Path(candidate)):
            raise
        return crash_report(e, reference=reference, candidate=candidate, profile=prof, inputs=meta, notes=notes,
                            runners={"reference": ref_label})
    for (h_r, l_r), (h_c, l_c) in zip(ref_out, cand_out, strict=True):
        enc_cmp.add(h_r, h_c)
        dec_cmp.add(l_r, l_c)
    checks: list[Check] = [enc_cmp.check(), dec_cmp.check()]
    if plan is not None and ref_trace is not None and cand_trace is not None:
        found, decode_notes = decode_checks(ref_trace[0], cand_trace[0], cand_trace[1], plan, profile=prof)
        checks += found
        notes += decode_notes
        if plan.decode_steps and ref_cross and cand_cross:
            checks.append(_cross_check(ref_cross, cand_cross, plan.enc_mask, prof))
    report = outputs_report(reference=reference, candidate=candidate, profile=prof, checks=checks, inputs=meta,
                            notes=notes, plan=plan, runners={"reference": ref_label, "candidate": cand_label})
    report.extra["graphs"] = {"reference": list(ref_sig.graphs) or None, "candidate": list(cand_sig.graphs) or None}
    return report


def _run_side(sig: Seq2SeqSig, feeds: list[dict[str, Any]], dec_feeds: list[np.ndarray], plan: Seq2SeqPlan | None,
              *, provider: str, reference: Any = None) -> tuple[list[tuple[np.ndarray, np.ndarray]], Any,
                                                                  list[tuple[np.ndarray, np.ndarray]], str]:
    """Load one side, run the forward checks' batches and the decode loop, release it.

    Returns:
        ((encoder hidden states, decoder logits) per batch, the decode loop's (trace, free tokens) or None,
        the cross-attention cache after the decode loop, what ran it).
    """
    from llmconv.verification.decode import decode_side

    status.note(f"loading {Path(sig.path).name}")
    runner = _open(sig, provider)
    try:
        out = []
        for i, (feed, dec) in enumerate(zip(feeds, dec_feeds, strict=True)):
            status.step(i + 1, len(feeds), "sample")
            step = _Stepper(runner, feed["input_ids"], feed["attention_mask"])
            logits = np.asarray(step.forward(dec, np.ones_like(dec), np.zeros_like(dec)), dtype=np.float32)
            hidden = step.hidden
            out.append((np.asarray(hidden.float().numpy() if hasattr(hidden, "float") else hidden,
                                   dtype=np.float32), logits))
        traced, cross = None, []
        if plan is not None:
            made: list[_Stepper] = []

            def make() -> _Stepper:
                made.append(_Stepper(runner, plan.enc_ids, plan.enc_mask))
                return made[-1]

            runner.stepper = make
            traced = decode_side(runner, sig, plan, reference[0] if reference is not None else None)
            cross = made[0].cross() if made else []
    finally:
        runner.close()
    return out, traced, cross, runner.label


def _cross_check(ref: list[tuple[np.ndarray, np.ndarray]], cand: list[tuple[np.ndarray, np.ndarray]],
                 enc_mask: np.ndarray, profile: Any) -> Check:
    """``decode.cross_cache``: each decoder layer's cross-attention keys and values, at the prompts' real tokens."""
    from llmconv.verification.decode import compare_cache_layers

    keep = enc_mask == 1

    def pick(i: int, label: str, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray] | Check:
        if a.shape != b.shape:
            return Check("decode.cross_cache", False, {"layer": i}, f"present.{i}.encoder.{label} has shape "
                         f"{list(b.shape)} in the candidate, {list(a.shape)} in the reference")
        return a.transpose(0, 2, 1, 3)[keep], b.transpose(0, 2, 1, 3)[keep]

    return compare_cache_layers("decode.cross_cache", ref, cand, profile, pick=pick, what="cross-attention cache",
                                label=lambda i, label: f"present.{i}.encoder.{label}")


def graph_files(folder: Path) -> list[Path]:
    """The graph files of an encoder-decoder ONNX folder, encoder first."""
    found = [Path(folder) / n for n in GRAPH_FILES if (Path(folder) / n).is_file()]
    if not found:
        raise InputError(f"the folder holds no {ENCODER}", path=folder)
    return found
