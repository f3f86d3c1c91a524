"""The cached decode loop and greedy generation, run the way ``generate()`` runs a causal LM.

A batch of prompts is left-padded (as ``generate()`` wants for decoder-only models), its attention mask
and position ids built by transformers' own rule (``cumsum(mask) - 1``, padded positions set to 1), and
prefilled with an empty cache. Then each side decodes one token at a time, feeding back its own cache:
``present.*`` into ``past_key_values.*`` for an ONNX graph, the transformers cache object for PyTorch; a
graph that takes no past recomputes the whole sequence at every step, as ``ORTModelForCausalLM`` does
with ``use_cache=False``.

The reference decodes greedily and its tokens are kept. The candidate is then fed the reference's
tokens (teacher forcing), so that its logits at every step are computed on the same context and can be
compared with the profile's metrics; the first step where its own greedy choice differs is where its
free generation would part from the reference's. Only when some prompt parts does the candidate also
generate freely, for the agreement figures. Generation runs the full number of tokens past any
end-of-sequence token: both models are compared at every step.

Peak memory: one model, plus logits of the prompts and of every step, plus one cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmconv import progress
from llmconv.errors import InputError, Unsupported, UsageError
from llmconv.verification.metrics import OutputComparison
from llmconv.verification.profiles import OutputsProfile
from llmconv.verification.report import Check

DEFAULT_DECODE_STEPS = 4
DEFAULT_GENERATE = 6
DECODE_PROMPT_LEN = 8  # longest sampled prompt: the prefill is a forward pass of every prompt at this width
DEFAULT_PROMPTS = 4
MAX_PROMPTS = 32
PREFILL_KEEP = 16  # prefill logits kept per prompt (its last positions): long prompts of a large vocabulary add up
# The candidate's cached steps against its own pass over the whole sequence without a cache: the same model, so
# quantization error cancels out. Measured on the trained GPT-2: fp32, fp16 and int4 (weight-only) graphs agree
# to KL < 1e-8 (int4: 6e-6 on an emulated AVX2 CPU); int8-dynamic (activation scales per tensor, so they depend
# on the sequence) to KL 2-4e-4, cosine 0.99998 (0.99985 on the random tiny Llama, whose logits are small); a
# graph whose position ids are off by one once the cache is not empty gives KL 0.009-0.011, one that swaps two
# layers' caches 0.17-0.22, a zeroed past 0.35-0.47. KL decides; the cosine floor only catches what KL cannot
# see (a uniformly scaled output).
CONSISTENCY_MIN_COSINE = 0.999
CONSISTENCY_MAX_KL = 2e-3


@dataclass
class DecodePlan:
    """The prompts, left-padded, and how far to decode.

    Attributes:
        ids: token ids [prompts, length], left-padded with ``pad_id``.
        mask: attention mask [prompts, length]: 0 on the padding.
        decode_steps: cached forward calls whose logits are compared (K).
        generate: greedy tokens compared per prompt (N).
        source: where the prompts came from, in words.
        pad_id: the id the padding holds.
    """

    ids: np.ndarray
    mask: np.ndarray
    decode_steps: int
    generate: int
    source: str
    pad_id: int

    @property
    def calls(self) -> int:
        """Decode calls after the prefill: enough for K compared steps and N - 1 tokens after the first."""
        return max(self.decode_steps, self.generate - 1, 0)

    # How a layer's cache is named after ``present.{i}.`` (an encoder-decoder's self-attention: ``decoder.``).
    cache_label = ""

    def prompt_tokens(self) -> list[int]:
        """The real tokens of each prompt."""
        return [int(n) for n in self.mask.sum(axis=1)]

    def meta(self) -> dict[str, Any]:
        lengths = self.prompt_tokens()
        return {"prompts": len(lengths), "prompt_lengths": lengths, "left_padded": sum(n < self.mask.shape[1]
                                                                                        for n in lengths),
                "decode_steps": self.decode_steps, "generate": self.generate, "source": self.source,
                "prompt_ids": [[int(t) for t in row[row_mask == 1]] for row, row_mask in zip(self.ids, self.mask,
                                                                                             strict=True)]}


def positions(mask: np.ndarray) -> np.ndarray:
    """Position ids as ``generate()`` builds them: ``cumsum(mask) - 1``, and 1 where the mask is 0."""
    pos = np.cumsum(mask, axis=-1, dtype=np.int64) - 1
    pos[mask == 0] = 1
    return pos


def make_plan(*, vocab_size: int, max_positions: int | None, pad_id: int | None, decode_steps: int, generate: int,
              seq_len: int, seed: int, prompt_ids: list[list[int]] | None = None,
              source: str = "sampled ids") -> DecodePlan:
    """The prompts of the decode and generation checks, left-padded into one batch.

    Args:
        vocab_size: ids are drawn (or must lie) below this.
        max_positions: the models' position count: a prompt plus every decoded token must fit.
        pad_id: the id padding holds (the model's pad token; 0 when it names none).
        decode_steps: K, compared cached steps.
        generate: N, compared greedy tokens.
        seq_len: the longest sampled prompt (at most DECODE_PROMPT_LEN); the others are 3/4, 1/2 and 1/4 of it
            (so three rows are padded).
        seed: random seed of sampled prompts.
        prompt_ids: the prompts as token ids (from ``--prompts`` or ``--text``), instead of sampled ones.
        source: where ``prompt_ids`` came from, for the report.
    Returns:
        A DecodePlan.
    Raises:
        UsageError: negative counts, or no room for the prompts and the decoded tokens in the positions.
    Example:
        >>> make_plan(vocab_size=100, max_positions=None, pad_id=0, decode_steps=8, generate=16, seq_len=8,
        ...           seed=0).mask.sum(axis=1).tolist()
        [8, 6, 4, 2]
    """
    if decode_steps < 0 or generate < 0:
        raise UsageError("--decode-steps and --generate must be 0 or more")
    calls = max(decode_steps, generate - 1, 0)
    room = None if max_positions is None else max_positions - calls
    if room is not None and room < 1:
        raise UsageError(f"the model has {max_positions} positions: no room for a prompt and {calls} decoded tokens",
                         hint=f"use --decode-steps of at most {max_positions - 1} and --generate of at most "
                              f"{max_positions}")
    pad = pad_id if pad_id is not None and 0 <= pad_id < vocab_size else 0
    if prompt_ids is None:
        longest = max(1, min(seq_len, DECODE_PROMPT_LEN) if room is None else min(seq_len, DECODE_PROMPT_LEN, room))
        lengths = [max(1, longest * k // DEFAULT_PROMPTS) for k in range(DEFAULT_PROMPTS, 0, -1)]
        rng = np.random.default_rng(seed + 7919)  # not the forward inputs' draws
        prompt_ids = []
        for n in lengths:
            row = rng.integers(0, max(vocab_size - 1, 1), size=n, dtype=np.int64)
            if vocab_size >= 2:
                row += row >= pad  # no pad id inside a prompt
            prompt_ids.append([int(t) for t in row])
    else:
        if not prompt_ids:
            raise UsageError("no prompts to generate from")
        for p in prompt_ids:
            if not p:
                raise UsageError("a prompt tokenizes to no tokens")
            if min(p) < 0 or max(p) >= vocab_size:
                raise UsageError(f"a prompt holds token ids outside the vocabulary [0, {vocab_size})")
        if room is not None and any(len(p) > room for p in prompt_ids):
            prompt_ids = [p[-room:] for p in prompt_ids]  # keep each prompt's end: that is what is continued
            source += f" (prompts cut to their last {room} tokens: the model has {max_positions} positions)"
    if len({len(p) for p in prompt_ids}) == 1 and (room is None or room >= 2):
        # generate() left-pads the shorter prompts of a batch: make one, so that a padded row is always decoded.
        first = prompt_ids[0]
        if len(first) >= 2:
            prompt_ids = [*prompt_ids, first[len(first) // 2:]]
            source += " (+ the second half of the first prompt, so that a row is left-padded)"
        else:
            prompt_ids = [*prompt_ids, first * 2]
            source += " (+ the first prompt twice, so that the others are left-padded)"
    width = max(len(p) for p in prompt_ids)
    ids = np.full((len(prompt_ids), width), pad, dtype=np.int64)
    mask = np.zeros((len(prompt_ids), width), dtype=np.int64)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return DecodePlan(ids=ids, mask=mask, decode_steps=decode_steps, generate=generate, source=source, pad_id=pad)


def prompt_plan(ref: Any, cand: Any, *, decode_steps: int, generate: int, prompts: Path | None,
                texts: tuple[list[int], list[int]] | None = None, seq_len: int, seed: int) -> DecodePlan:
    """The decode checks' prompts for two models (their signatures: vocabulary, positions, pad id, tokenizer):
    ``--prompts`` tokenized with the first side's tokenizer that has files, else windows of ``--text``'s tokens,
    else sampled ids."""
    vocabs = [v for v in (ref.vocab_size, cand.vocab_size) if v]
    if not vocabs:
        raise UsageError("cannot tell the model's vocabulary size to make prompts", path=cand.path,
                         hint="give config.json beside the model")
    found = [p for p in (ref.max_positions, cand.max_positions) if p]
    pads = [s.pad_token_id for s in (ref, cand) if s.pad_token_id is not None]
    common = {"vocab_size": min(vocabs), "max_positions": min(found) if found else None,
              "pad_id": pads[0] if pads else None, "decode_steps": decode_steps, "generate": generate,
              "seq_len": seq_len, "seed": seed}
    if prompts is not None:
        folder = ref.tokenizer_dir or cand.tokenizer_dir
        if folder is None:
            raise UsageError("--prompts needs a tokenizer, and neither model's folder has tokenizer files",
                             path=Path(prompts), hint="copy tokenizer.json / tokenizer_config.json beside the model")
        from llmconv.export.tasks import open_tokenizer

        tok = open_tokenizer(folder)
        ids = read_prompts(Path(prompts), lambda line: tok(line)["input_ids"])
        return make_plan(**common, prompt_ids=ids, source=f"--prompts {prompts}")
    if texts is not None:
        return make_plan(**common, prompt_ids=text_prompts(texts[0], seq_len=seq_len), source="--text")
    return make_plan(**common)


def read_prompts(path: Path, encode: Any) -> list[list[int]]:
    """The prompts of a ``--prompts`` file (one per non-empty line), tokenized with ``encode`` (text -> ids)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError("no such prompts file", path=Path(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the prompts file as UTF-8: {e}", path=Path(path)) from None
    lines = [ln for ln in lines if ln.strip()]
    if not lines:
        raise UsageError("the prompts file has no prompt (one per line)", path=Path(path))
    if len(lines) > MAX_PROMPTS:
        raise UsageError(f"the prompts file has {len(lines)} prompts; at most {MAX_PROMPTS} run in one batch",
                         path=Path(path), hint=f"keep {MAX_PROMPTS} lines or fewer")
    return [list(encode(ln)) for ln in lines]


def text_prompts(tokens: list[int], *, seq_len: int) -> list[list[int]]:
    """Prompts cut from a tokenized text: windows spread over it, of 4/4 .. 1/4 of ``seq_len`` tokens."""
    out = []
    n = len(tokens)
    for k in range(DEFAULT_PROMPTS):
        length = max(1, min(n, seq_len * (DEFAULT_PROMPTS - k) // DEFAULT_PROMPTS))
        start = (n - length) * k // max(DEFAULT_PROMPTS - 1, 1)
        out.append(tokens[start:start + length])
    return out


# ---- one side's loop ------------------------------------------------------------------------------


@dataclass
class Trace:
    """What one side's decode loop gave.

    Attributes:
        prefill: logits at the prompts' real positions [tokens, vocab].
        steps: logits predicting each token: [calls + 1] arrays [prompts, vocab] (index 0: from the prefill).
        tokens: the side's own greedy choice at each step [prompts, calls + 1].
        cache: (key, value) per layer after the last call, or None for a side without a cache.
        prefill_cache: the past after the prefill, as the graph inputs ``past_key_values.*`` (for localizing).
        recomputed: the same side's logits for the decoded positions from one pass over the whole sequence
            with no cache [prompts, calls, vocab] (the candidate's, for the consistency check), or None.
        batched: for a graph decoded row by row (``Signature.unpadded_only``), its logits when the same prompts
            run as one right-padded batch, as onnxruntime-genai batches them [prompts, calls + 1, vocab], or None.
    """

    prefill: np.ndarray
    steps: list[np.ndarray] = field(default_factory=list)
    tokens: np.ndarray | None = None
    cache: list[tuple[np.ndarray, np.ndarray]] | None = None
    prefill_cache: dict[str, np.ndarray] | None = None
    recomputed: np.ndarray | None = None
    batched: np.ndarray | None = None


class _OrtPast:
    """An ONNX graph with past key/values: its ``present.*`` are fed back."""

    def __init__(self, runner: Any, sig: Any) -> None:
        self.runner, self.sig = runner, sig
        self.pairs = []  # (past input, present output)
        for k, v in sig.past.names:
            for name in (k, v):
                present = name.replace("past_key_values.", "present.", 1)
                if present not in runner.outputs:
                    raise Unsupported(f"the graph takes {name} but gives no {present} to feed back",
                                      path=sig.model_path, hint="export it with optimum's -with-past task, or verify "
                                                                "with --decode-steps 0 --generate 0")
                self.pairs.append((name, present))
        self.past: dict[str, np.ndarray] | None = None

    def forward(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        from llmconv.verification.inputs import empty_past

        feed = plain_feed(self.sig.inputs, ids, mask, pos)
        feed.update(self.past if self.past is not None else empty_past(self.sig.past, ids.shape[0]))
        out = self.runner.run(feed, ["logits", *(p for _, p in self.pairs)])
        self.past = {name: out[present] for name, present in self.pairs}
        return out["logits"]

    def cache(self) -> list[tuple[np.ndarray, np.ndarray]]:
        assert self.past is not None
        return [(self.past[k], self.past[v]) for k, v in self.sig.past.names]

    def feed_past(self) -> dict[str, np.ndarray]:
        return dict(self.past or {})


class _OrtRecompute:
    """A graph without a cache: the whole sequence runs again at every step."""

    def __init__(self, runner: Any, sig: Any) -> None:
        self.runner, self.sig = runner, sig
        self.ids: np.ndarray | None = None

    def forward(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        self.ids = ids if self.ids is None else np.concatenate([self.ids, ids], axis=1)
        feed = plain_feed(self.sig.inputs, self.ids, mask, positions(mask))
        return self.runner.run(feed, ["logits"])["logits"][:, -ids.shape[1]:]

    def cache(self) -> None:
        return None

    def feed_past(self) -> dict[str, np.ndarray]:
        return {}


class _Torch:
    """A transformers model fed back its own cache object, with the inputs ``generate()`` gives it."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.state: Any = None

    def forward(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        logits, self.state = self.runner.forward_cached(ids, mask, pos, self.state)
        return logits

    def cache(self) -> list[tuple[np.ndarray, np.ndarray]]:
        from llmconv.verification.runners import _cache_layers

        return [(k.float().numpy(), v.float().numpy()) for k, v in _cache_layers(self.state)]

    def feed_past(self) -> dict[str, np.ndarray]:
        return {f"past_key_values.{i}.{label}": t for i, (k, v) in enumerate(self.cache())
                for label, t in (("key", k), ("value", v))}


class _OrtRows:
    """A graph whose attention cannot mask a left-padded row (``Signature.unpadded_only``): each prompt runs
    alone and unpadded through its own cache, as onnxruntime-genai's Generator runs it, and the logits and caches
    are put back in the batch's left-padded layout (zeros on the padding)."""

    def __init__(self, runner: Any, sig: Any) -> None:
        self.runner, self.sig = runner, sig
        self.rows: list[_OrtPast] = []
        self.lengths: list[int] = []

    def forward(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        batch, width = ids.shape
        first = not self.rows
        if first:
            self.rows = [_OrtPast(self.runner, self.sig) for _ in range(batch)]
            self.lengths = [0] * batch
        out: np.ndarray | None = None
        for b, row in enumerate(self.rows):
            row_ids = ids[b:b + 1, mask[b, -width:] == 1] if first else ids[b:b + 1]
            n = self.lengths[b] = self.lengths[b] + row_ids.shape[1]
            logits = np.asarray(row.forward(row_ids, np.ones((1, n), dtype=np.int64),
                                            np.arange(n - row_ids.shape[1], n, dtype=np.int64)[None, :]))
            if out is None:
                out = np.zeros((batch, width, logits.shape[-1]), dtype=logits.dtype)
            out[b, width - logits.shape[1]:] = logits[0]
        assert out is not None
        return out

    def cache(self) -> list[tuple[np.ndarray, np.ndarray]]:
        per_row = [row.cache() for row in self.rows]
        longest = max(self.lengths)

        def stack(tensors: list[np.ndarray]) -> np.ndarray:
            padded = np.zeros((len(tensors), *tensors[0].shape[1:2], longest, *tensors[0].shape[3:]),
                              dtype=tensors[0].dtype)
            for b, t in enumerate(tensors):
                padded[b, :, longest - t.shape[2]:] = t[0]
            return padded

        return [(stack([r[i][0] for r in per_row]), stack([r[i][1] for r in per_row]))
                for i in range(len(per_row[0]))]

    def feed_past(self) -> dict[str, np.ndarray]:
        return {}  # rows of different lengths make no batch of past inputs (nothing is localized from them)


def counts_own_positions(*sigs: Any) -> bool:
    """Whether a side is a graph that takes no position_ids and runs padded rows: it counts positions itself,
    padding included (a graph run row by row starts each unpadded row at 0, as the reference does)."""
    return any(sig.kind == "onnxruntime" and "position_ids" not in sig.inputs and not sig.unpadded_only
               for sig in sigs)


def unpadded_note(*sigs: Any, batched: bool) -> list[str]:
    """What the report says when a side decoded its prompts one at a time (``batched``: decode.batched ran)."""
    also = (" (decode.batched also ran them as one batch padded on the right, the way onnxruntime-genai batches "
            "them)") if batched else ""
    return [f"the {role} graph's {sig.unpadded_only} reads the attention mask as row lengths, so it cannot mask a "
            f"left-padded row: its decode and generation checks ran each prompt unpadded, one at a time{also}; "
            "feed it one prompt at a time or prompts of equal length, never a left-padded batch (as transformers' "
            "generate() pads one)"
            for role, sig in zip(("reference", "candidate"), sigs, strict=True)
            if getattr(sig, "unpadded_only", None)]


def plain_feed(takes: set[str], ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> dict[str, np.ndarray]:
    """Token ids and mask, with the position ids and token type ids a graph that takes them needs."""
    feed = {"input_ids": ids, "attention_mask": mask}
    if "position_ids" in takes:
        feed["position_ids"] = pos
    if "token_type_ids" in takes:
        feed["token_type_ids"] = np.zeros_like(ids)
    return feed


def _stepper(runner: Any, sig: Any) -> Any:
    make = getattr(runner, "stepper", None)  # an encoder-decoder's (llmconv.verification.seq2seq)
    if make is not None:
        return make()
    if runner.kind == "torch":
        return _Torch(runner)
    if sig.past is not None:
        return _OrtRows(runner, sig) if sig.unpadded_only else _OrtPast(runner, sig)
    return _OrtRecompute(runner, sig)


def run_loop(runner: Any, sig: Any, plan: DecodePlan, *, calls: int, forced: np.ndarray | None = None,
             keep_prefill_cache: bool = False) -> Trace:
    """Prefill the prompts, then ``calls`` decode steps through the side's own cache.

    Args:
        runner: an open runner (``runners.open_runner``).
        sig: its signature.
        plan: the prompts.
        calls: decode calls after the prefill.
        forced: tokens to feed [prompts, >= calls] (teacher forcing); None feeds the side's own greedy choice.
        keep_prefill_cache: keep the past after the prefill as graph inputs (for localizing a failure).
    Returns:
        A Trace.
    """
    side = _stepper(runner, sig)
    mask = plan.mask
    progress.note("prefill")
    logits = np.asarray(side.forward(plan.ids, mask, positions(mask)), dtype=np.float32)
    width = mask.shape[1]
    trace = Trace(prefill=logits[(mask == 1) & (np.arange(width) >= width - PREFILL_KEEP)[None, :]])
    current = logits[:, -1, :]
    trace.steps.append(current)
    chosen = [current.argmax(axis=-1)]
    if keep_prefill_cache:
        trace.prefill_cache = side.feed_past()
    ones = np.ones((mask.shape[0], 1), dtype=mask.dtype)
    for s in range(calls):
        progress.step(s + 1, calls, "step")
        token = forced[:, s] if forced is not None else chosen[-1]
        mask = np.concatenate([mask, ones], axis=1)
        pos = mask.sum(axis=1, keepdims=True).astype(np.int64) - 1
        current = np.asarray(side.forward(token[:, None].astype(np.int64), mask, pos)[:, -1, :], dtype=np.float32)
        trace.steps.append(current)
        chosen.append(current.argmax(axis=-1))
    trace.tokens = np.stack(chosen, axis=1)
    trace.cache = side.cache()
    return trace


def decode_side(runner: Any, sig: Any, plan: DecodePlan, reference: Trace | None = None,
                *, keep_prefill_cache: bool = False) -> tuple[Trace, np.ndarray | None]:
    """One side's part: the reference decodes greedily; the candidate is teacher-forced on the reference's
    tokens and, when its own choice parts from them within the generated tokens, also generates freely.

    Returns:
        (trace, the candidate's freely generated tokens [prompts, N] or None when they equal the reference's).
    """
    if reference is None:
        with progress.phase("decoding greedily"):
            return run_loop(runner, sig, plan, calls=plan.calls, keep_prefill_cache=keep_prefill_cache), None
    assert reference.tokens is not None
    with progress.phase("decoding the reference's tokens"):
        trace = run_loop(runner, sig, plan, calls=plan.calls, forced=reference.tokens)
    assert trace.tokens is not None
    if plan.decode_steps and trace.cache is not None:
        with progress.phase("recomputing the decoded steps without the cache"):
            trace.recomputed = recompute(runner, sig, plan, reference.tokens[:, :plan.decode_steps])
    if plan.decode_steps and getattr(sig, "unpadded_only", None) and sig.past is not None:
        with progress.phase("decoding the prompts as one right-padded batch"):
            trace.batched = right_padded(runner, sig, plan, reference.tokens[:, :plan.decode_steps])
    n = plan.generate
    if n and (trace.tokens[:, :n] != reference.tokens[:, :n]).any():
        with progress.phase("generating on its own (its tokens part from the reference's)"):
            free = run_loop(runner, sig, plan, calls=n - 1)
        assert free.tokens is not None
        return trace, free.tokens[:, :n]
    return trace, None


def right_padded(runner: Any, sig: Any, plan: DecodePlan, tokens: np.ndarray) -> np.ndarray:
    """The prompts as one batch padded on the right, teacher-forced on ``tokens``, as onnxruntime-genai batches
    prompts for a graph whose attention takes row lengths: a row's mask holds its real tokens first, then zeros,
    then a one per decoded token (the graph reads each row's length from it). Returns each row's logits after
    its prompt and after each token [prompts, len(tokens[0]) + 1, vocab]."""
    lengths = plan.mask.sum(axis=1)
    width = plan.mask.shape[1]
    ids = np.full_like(plan.ids, plan.pad_id)
    mask = np.zeros_like(plan.mask)
    for b, n in enumerate(lengths):
        ids[b, :n] = plan.ids[b, width - n:]
        mask[b, :n] = 1
    side = _OrtPast(runner, sig)
    rows = np.arange(len(lengths))
    out = [np.asarray(side.forward(ids, mask, positions(mask)), dtype=np.float32)[rows, lengths - 1]]
    ones = np.ones((len(lengths), 1), dtype=mask.dtype)
    for s in range(tokens.shape[1]):
        mask = np.concatenate([mask, ones], axis=1)
        pos = mask.sum(axis=1, keepdims=True).astype(np.int64) - 1
        out.append(np.asarray(side.forward(tokens[:, s:s + 1].astype(np.int64), mask, pos)[:, -1],
                              dtype=np.float32))
    return np.stack(out, axis=1)


def recompute(runner: Any, sig: Any, plan: DecodePlan, tokens: np.ndarray) -> np.ndarray:
    """Logits predicting the token after each of ``tokens`` from one pass over prompts + tokens with an empty
    cache: what the cached steps fed these tokens must give [prompts, len(tokens[0]), vocab]."""
    ids = np.concatenate([plan.ids, tokens.astype(np.int64)], axis=1)
    mask = np.concatenate([plan.mask, np.ones(tokens.shape, dtype=plan.mask.dtype)], axis=1)
    logits = _stepper(runner, sig).forward(ids, mask, positions(mask))
    return np.asarray(logits[:, -tokens.shape[1]:, :], dtype=np.float32)


# ---- comparing the two sides ----------------------------------------------------------------------


def decode_checks(ref: Trace, cand: Trace, free: np.ndarray | None, plan: DecodePlan, *, profile: OutputsProfile,
                  sliding: int | None = None, own_positions: bool = False) -> tuple[list[Check], list[str]]:
    """The decode-loop checks: ``decode.prefill``, ``decode.steps``, ``decode.cache`` and ``generation``.

    Args:
        ref: the reference's trace.
        cand: the candidate's, teacher-forced on the reference's tokens.
        free: the candidate's own greedy tokens when they part from the reference's, else None.
        plan: the prompts and counts.
        profile: the thresholds.
        sliding: the sliding window of the models, if any (a cache may keep only the last positions).
        own_positions: a side is a graph that takes no position ids and counts them itself, from the start
            of the row, padding included: its rotary keys on a left-padded row are turned by a constant angle
            that attention does not see, so caches are compared on the rows without padding.
    Returns:
        (checks, notes).
    """
    notes: list[str] = []
    checks: list[Check] = []
    prefill = OutputComparison("decode.prefill", profile=profile, logits=True)
    prefill.add(ref.prefill, cand.prefill)
    checks.append(prefill.check())
    k = plan.decode_steps
    if k:
        checks.append(_steps_check(ref.steps[1:k + 1], cand.steps[1:k + 1], profile))
        if cand.recomputed is not None:
            checks.append(_consistency_check(cand, k, profile))
        if cand.batched is not None:
            checks.append(_batched_check(cand, k, profile))
        if ref.cache is not None and cand.cache is not None:
            rows = plan.mask.all(axis=1) if own_positions else np.ones(plan.mask.shape[0], dtype=bool)
            if own_positions:
                notes.append(f"a graph takes no position_ids: decode.cache compares only the prompts without padding "
                             f"({int(rows.sum())} of {len(rows)}); on a padded row its positions count the padding, "
                             "which turns its rotary keys by a constant angle that attention does not see")
            checks.append(_cache_check(ref.cache, cand.cache, plan, profile, sliding, notes, rows))
        else:
            side = "reference" if ref.cache is None else "candidate"
            notes.append(f"the {side} takes no past key/values: it recomputed the whole sequence at every decode "
                         "step, and no cache was compared")
    if plan.generate:
        checks.append(generation_check(ref, cand, free, plan, profile))
    return checks, notes


def _steps_check(ref: list[np.ndarray], cand: list[np.ndarray], profile: OutputsProfile) -> Check:
    total = OutputComparison("decode.steps", profile=profile, logits=True)
    a, b = np.stack(ref), np.stack(cand)  # [steps, prompts, vocab]
    total.add(a, b)
    # Per step, the figures that say where it starts: the largest difference and the top-1 agreement.
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64)).reshape(len(ref), -1)
    same = (a.argmax(axis=-1) == b.argmax(axis=-1)).mean(axis=-1)
    per_step = [{"step": i + 1, "max_abs": float(diff[i].max()) if diff[i].size else 0.0,
                 "top1_agreement": float(same[i])} for i in range(len(ref))]
    check = total.check()
    check.figures["steps"] = per_step
    first = None if check.passed else _first_step_out(a, b, profile)
    check.figures["first_failing_step"] = first
    if first is not None:
        check.reason += f" (first at decode step {first} of {len(per_step)})"
    return check


def _first_step_out(a: np.ndarray, b: np.ndarray, profile: OutputsProfile) -> int | None:
    """The first decode step whose logits alone leave the profile (1-based), or None."""
    for i in range(a.shape[0]):
        one = OutputComparison("step", profile=profile, logits=True)
        one.add(a[i], b[i])
        if not one.check().passed:
            return i + 1
    return None


def _batched_check(cand: Trace, k: int, profile: OutputsProfile) -> Check:
    """``decode.batched``: a graph decoded row by row, against itself running the same prompts as one right-padded
    batch (the candidate on both sides, so quantization cancels out, with decode.consistency's limits): catches
    a graph whose row lengths or mask are wrong only in a batch."""
    assert cand.batched is not None
    comparison = OutputComparison("decode.batched", profile=_self_profile(profile), logits=True)
    comparison.add(np.stack(cand.steps[:k + 1], axis=1), cand.batched)
    check = comparison.check()
    if not check.passed:
        check.reason += ("; the candidate gives other logits for a prompt in a right-padded batch than for the same "
                         "prompt alone: it reads the rows' lengths or its attention mask wrongly in a batch")
    return check


def _self_profile(profile: OutputsProfile) -> OutputsProfile:
    """The limits of a comparison of the candidate with itself: fp32's tolerances for the elementwise profiles
    (exact, fp32, --atol), else CONSISTENCY_MIN_COSINE and CONSISTENCY_MAX_KL."""
    from dataclasses import replace

    if profile.elementwise:  # exact, fp32 or a user's --atol: two computations of one model differ in rounding
        from llmconv.verification.profiles import outputs_profile

        return replace(outputs_profile("fp32"), name=profile.name)
    return replace(profile, min_cosine=CONSISTENCY_MIN_COSINE, min_top1=None, min_top5=None,
                   max_kl=CONSISTENCY_MAX_KL)


def _consistency_check(cand: Trace, k: int, profile: OutputsProfile) -> Check:
    """``decode.consistency``: the candidate's logits through its own cache against its own logits from one pass
    without a cache, on the same tokens. Quantization cancels out (the same model on both sides), so this catches
    a cache, mask or position fault at any precision: fp32's tolerances for the elementwise profiles (exact, fp32,
    --atol), else cosine and KL limits set from measurements (CONSISTENCY_MIN_COSINE, CONSISTENCY_MAX_KL)."""
    assert cand.recomputed is not None
    prof = _self_profile(profile)
    comparison = OutputComparison("decode.consistency", profile=prof, logits=True)
    cached = np.stack(cand.steps[1:k + 1], axis=1)  # [prompts, steps, vocab]
    comparison.add(cand.recomputed, cached)
    check = comparison.check()
    if not check.passed:
        check.reason += ("; the candidate's cached steps disagree with its own pass over the whole sequence: its "
                         "past key/values, attention mask or position ids are handled wrongly once the cache is "
                         "not empty")
    check.figures["limits"] = {"min_cosine": prof.min_cosine, "max_kl": prof.max_kl} if not prof.elementwise else \
        {"atol": prof.atol, "rtol": prof.rtol}
    return check


def _cache_check(ref: list[tuple[np.ndarray, np.ndarray]], cand: list[tuple[np.ndarray, np.ndarray]],
                 plan: DecodePlan, profile: OutputsProfile, sliding: int | None, notes: list[str],
                 rows: np.ndarray) -> Check:
    calls = plan.calls
    mask = np.concatenate([plan.mask, np.ones((plan.mask.shape[0], calls), dtype=plan.mask.dtype)], axis=1)
    trimmed = 0

    def pick(i: int, label: str, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        nonlocal trimmed
        if a.ndim != 4 or b.ndim != 4:
            return a, b
        n = min(a.shape[2], b.shape[2])
        if a.shape[2] != b.shape[2] and sliding:
            trimmed = n
        # [prompts, heads, positions, dim] -> the real positions only; padding holds whatever each side made.
        keep = (mask[:, -n:] == 1) & rows[:, None]
        return a[:, :, -n:, :].transpose(0, 2, 1, 3)[keep], b[:, :, -n:, :].transpose(0, 2, 1, 3)[keep]

    check = compare_cache_layers("decode.cache", ref, cand, profile, pick=pick, what="cache",
                                 label=lambda i, label: f"present.{i}.{plan.cache_label}{label}")
    if trimmed:
        notes.append(f"sliding window {sliding}: one side's cache keeps only the last {trimmed} positions; the "
                     "decode caches were compared on the positions both keep")
    if "first_failing" in check.figures:  # positions before first_failing, as the report has always listed them
        first = check.figures.pop("first_failing")
        check.figures.update(positions=int(mask.shape[1]), first_failing=first)
    return check


def compare_cache_layers(name: str, ref: list[tuple[np.ndarray, np.ndarray]],
                         cand: list[tuple[np.ndarray, np.ndarray]], profile: Any, *, pick: Any, label: Any,
                         what: str) -> Check:
    """One check over every layer's key and value: ``pick(i, "key"|"value", ref, cand)`` gives the two arrays to
    compare (their real positions), or a failed Check to return at once; ``label(i, kind)`` names a tensor. The
    figures name the first tensor that fails on its own."""
    if len(ref) != len(cand):
        return Check(name, False, {}, f"the candidate's {what} has {len(cand)} layers, the reference's {len(ref)}")
    total = OutputComparison(name, profile=profile, logits=False)
    first_bad = None
    for i, (kv_r, kv_c) in enumerate(zip(ref, cand, strict=True)):
        for kind, a, b in (("key", kv_r[0], kv_c[0]), ("value", kv_r[1], kv_c[1])):
            picked = pick(i, kind, a, b)
            if isinstance(picked, Check):
                return picked
            a, b = picked
            total.add(a, b)
            if first_bad is None:
                one = OutputComparison(label(i, kind), profile=profile, logits=False)
                one.add(a, b)
                if not one.check().passed:
                    first_bad = label(i, kind)
    check = total.check()
    check.figures["layers"] = len(ref)
    check.figures["first_failing"] = first_bad
    if not check.passed and first_bad:
        check.reason += f" (first: {first_bad})"
    return check


def generation_check(ref: Trace, cand: Trace, free: np.ndarray | None, plan: DecodePlan,
                     profile: OutputsProfile) -> Check:
    """Greedy generation of N tokens per prompt: where each prompt first parts, and how much agrees.

    A prompt's ``agreement`` is the share of the N tokens generated before it parts (1.0 when identical);
    ``token_agreement`` the share of positions holding the same token in the two free generations. A part
    at a step where the reference's two candidates for the token are within the profile's elementwise
    tolerance of each other is a tie (numerical noise decides it), and counts as agreeing.
    """
    n = plan.generate
    assert ref.tokens is not None and cand.tokens is not None
    r, c_forced = ref.tokens[:, :n], cand.tokens[:, :n]
    c_free = free if free is not None else r
    rows = []
    lengths = plan.prompt_tokens()
    for m in range(r.shape[0]):
        parts = np.flatnonzero(r[m] != c_forced[m])
        first = int(parts[0]) if parts.size else None
        tie = False
        if first is not None and profile.elementwise:
            logits = ref.steps[first][m].astype(np.float64)
            a, b = int(r[m, first]), int(c_forced[m, first])
            tie = bool(logits[a] - logits[b] <= (profile.atol or 0.0) + (profile.rtol or 0.0) * abs(logits[a]))
        agreement = 1.0 if first is None or tie else first / n
        row = {"prompt": m, "prompt_tokens": lengths[m], "first_divergence": first,
               "agreement": agreement, "token_agreement": float((c_free[m] == r[m]).mean()), "tie": tie}
        if first is not None:
            row["reference_tokens"] = [int(t) for t in r[m]]
            row["candidate_tokens"] = [int(t) for t in c_free[m]]
        rows.append(row)
    identical = sum(1 for row in rows if row["first_divergence"] is None)
    ties = sum(1 for row in rows if row["tie"])
    mean = float(np.mean([row["agreement"] for row in rows]))
    limit = profile.min_generation
    figs: dict[str, Any] = {"prompts": len(rows), "new_tokens": n, "identical": identical, "ties": ties,
                            "agreement": mean,
                            "token_agreement": float(np.mean([row["token_agreement"] for row in rows])),
                            "min_agreement": limit, "per_prompt": rows}
    reason = ""
    if limit is not None and mean < limit:
        parted = [row for row in rows if row["first_divergence"] is not None and not row["tie"]]
        where = ", ".join(f"prompt {row['prompt']} at token {row['first_divergence']}" for row in parted[:4])
        reason = (f"greedy generation agreement {mean:.3f} < {limit:g}: {len(parted)} of {len(rows)} prompts part "
                  f"from the reference within {n} tokens ({where})")
    return Check("generation", not reason, figs, reason)
