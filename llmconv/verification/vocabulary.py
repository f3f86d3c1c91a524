"""The ``tokenizer`` check: a GGUF file's vocabulary, as transformers rebuilds it from the file's metadata, against
the model folder's own tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmconv.verification.report import Check

# Text the vocabulary check tokenizes: whitespace runs, digits, punctuation, accents, emoji, contractions (the cases
# llama.cpp's pre-tokenizer test string covers), and the special tokens where the tokenizer has them.
_TOKENIZER_TEXT = ("The quick brown fox jumps over the lazy dog, and a cat sat on the mat. "
                   "Hello World!\n\n  Tabs\tand   spaces. 3 33 333 3333 33333 3.14 3..3 -- ======= !!!??? ```"
                   "\n🚀 (normal) 😶\u200d🌫️ café naïve Ünïcödé 我想在apple工作 нещо на Български\n"
                   "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea?")


def tokenizer_check(folder: Path, gguf_file: Path, *, text: Path | None = None) -> Check | None:
    """The vocabulary the GGUF carries, as transformers' GGUF tokenizer rebuilds it from the file's metadata, against
    the folder's own tokenizer.json: the same ids for the same text (special tokens not added). None when the folder
    has no tokenizer.json to compare with.

    Returns:
        A Check ``tokenizer`` with ``texts``, ``tokens`` (the reference's count) and, when they differ,
        ``first_difference`` (position, the reference's ids and the GGUF's from there).
    """
    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        return None
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from llmconv.export._quiet import quiet
    from llmconv.formats.hf import linked_view

    samples = [_TOKENIZER_TEXT]
    if text is not None:
        body = Path(text).read_text(encoding="utf-8", errors="replace")
        samples += [body[i:i + 2000] for i in range(0, min(len(body), 20000), 2000)]
    specials = [a["content"] for a in (json.loads(tok_file.read_text(encoding="utf-8")).get("added_tokens") or [])
                if a.get("special")]
    if specials:
        samples.append(" ".join(["Before", *specials[:4], "after."]))
    reference = Tokenizer.from_file(str(tok_file))
    with linked_view({gguf_file.name: gguf_file}) as view, quiet():
        try:
            rebuilt = AutoTokenizer.from_pretrained(str(view), gguf_file=gguf_file.name, trust_remote_code=False)
        except (ValueError, KeyError, OSError, TypeError, NotImplementedError) as e:
            return Check("tokenizer", False, {"texts": len(samples)},
                         f"transformers cannot rebuild a tokenizer from the GGUF's vocabulary: {e}")
    figs: dict[str, Any] = {"texts": len(samples), "tokens": 0}
    for sample in samples:
        want = reference.encode(sample, add_special_tokens=False).ids
        got = rebuilt(sample, add_special_tokens=False)["input_ids"]
        figs["tokens"] += len(want)
        if want != got:
            at = next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), min(len(want), len(got)))
            figs["first_difference"] = {"position": at, "reference": want[at:at + 5], "gguf": got[at:at + 5]}
            return Check("tokenizer", False, figs, f"the GGUF's vocabulary tokenizes text differently from "
                                                   f"tokenizer.json (from token {at}: {want[at:at + 5]} vs "
                                                   f"{got[at:at + 5]})")
    return Check("tokenizer", True, figs)
