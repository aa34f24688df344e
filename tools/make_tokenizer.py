#!/usr/bin/env python3
"""Build a tiny, deterministic CLIP-style byte-level BPE tokenizer (no download).

Layout of vocab.json (same scheme as OpenAI CLIP / SD1.5's tokenizer):
    ids 0..255      the 256 byte-level unicode characters, in GPT-2 `bytes_to_unicode` order
    ids 256..511    the same 256 characters with the suffix `</w>` (end of word)
    ids 512..       one token per merge, in merge order (``a + b`` for merge ``a b``)
    last two ids    `<|startoftext|>`, `<|endoftext|>`

merges.txt is in CLIP format: first line `#version: 0.2`, then one `left right` merge per line,
ranked by line order.  The merges are learned here by a small deterministic BPE learner over a
caption-like corpus (ties broken by the lexicographically smallest pair).

The folder is then written through transformers' `save_pretrained` (slow and fast classes; in
transformers >= 5 both names are the same tokenizers-backed class) and completed so that it holds
vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json and tokenizer.json.

Finally the ids produced by transformers are cross-checked against an independent pure-Python
re-implementation of the original CLIP tokenizer algorithm (`ClassicClipBpe` below), which is the
algorithm a from-scratch Rust port would follow.

Usage: python3 tools/make_tokenizer.py [--out models/tiny-random/tokenizer] [--merges 300]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import unicodedata
from collections import Counter

import regex

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
DEFAULT_NUM_MERGES = 300

# The pre-tokenisation pattern of CLIP (identical in OpenAI's simple_tokenizer and transformers).
PAT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode char table, in canonical order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------
COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray", "cyan"]
SHAPES = ["circle", "square", "triangle", "star", "cross", "ring"]
VPOS = ["top", "bottom", "center", "middle"]
HPOS = ["left", "right", "center", "middle"]
SIZES = ["small", "large", "medium", "tiny", "big"]
PEOPLE = ["man", "woman", "person", "girl", "boy", "doctor", "nurse"]
AGES = ["old", "young"]
EXTRA = ["photograph", "painting", "drawing", "sketch", "illustration", "image", "close up", "render"]
VERBS = ["sitting", "standing", "smiling", "holding a cup", "wearing glasses", "reading a book", "walking"]
WORDS = ["shape", "shapes", "border", "hat", "dress", "shirt", "hair", "face", "eyes", "street", "city",
         "house", "tree", "sky", "water", "light", "dark", "bright", "colorful", "simple", "high", "quality",
         "detailed", "beautiful", "style", "art", "digital", "oil", "canvas", "from", "by", "is", "it",
         "this", "that", "for", "under", "over", "between", "next", "to", "near", "far"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "zero"]


def build_corpus() -> list[str]:
    """Deterministic list of caption-like sentences."""
    lines: list[str] = []
    i = 0
    for ci, colour in enumerate(COLOURS):
        for si, shape in enumerate(SHAPES):
            size = SIZES[(ci + si) % len(SIZES)]
            v = VPOS[(ci * 3 + si) % len(VPOS)]
            h = HPOS[(ci + 2 * si) % len(HPOS)]
            bg = COLOURS[(ci * 5 + si * 7 + 3) % len(COLOURS)]
            lines.append(f"a {size} {colour} {shape} at the {v} {h} on a {bg} background")
            n = NUMBERS[i % len(NUMBERS)]
            lines.append(f"{n} {colour} {shape}s in the {v} with an {bg} border and a {size} {shape}")
            i += 1
    for ai, age in enumerate(AGES):
        for pi, person in enumerate(PEOPLE):
            art = "an" if age[0] in "aeiou" else "a"
            lines.append(f"a photo of {art} {age} {person}")
            lines.append(f"a picture of the {person} with a {COLOURS[(ai + pi) % len(COLOURS)]} hat")
            lines.append(f"portrait of {art} {age} {person} on the {HPOS[pi % len(HPOS)]}")
    for ei, extra in enumerate(EXTRA):
        lines.append(f"a {extra} of a {AGES[ei % 2]} {PEOPLE[ei % len(PEOPLE)]} {VERBS[ei % len(VERBS)]}")
    lines.append(" ".join(EXTRA + VERBS + WORDS))
    lines.append(" ".join(NUMBERS))
    lines.append("0 1 2 3 4 5 6 7 8 9 10 100 2024")
    return lines


# --------------------------------------------------------------------------------------------
# BPE learner
# --------------------------------------------------------------------------------------------
def learn_bpe(corpus: list[str], num_merges: int, byte_encoder: dict[int, str], base_vocab: set[str]):
    word_freq: Counter = Counter()
    for line in corpus:
        for tok in PAT.findall(line.lower()):
            word_freq["".join(byte_encoder[b] for b in tok.encode("utf-8"))] += 1

    # Each word as a list of symbols; last symbol carries `</w>`.
    words = {}
    for w in sorted(word_freq):
        syms = list(w[:-1]) + [w[-1] + "</w>"]
        words[w] = syms

    vocab_tokens = set(base_vocab)
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter = Counter()
        for w, syms in words.items():
            f = word_freq[w]
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] += f
        if not pairs:
            break
        # Highest count first, then lexicographically smallest pair; skip pairs whose merged
        # string already exists as a token (keeps vocab entries unique).
        best = None
        for pair, cnt in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0])):
            if pair[0] + pair[1] not in vocab_tokens:
                best = pair
                break
        if best is None:
            break
        a, b = best
        merged = a + b
        merges.append(best)
        vocab_tokens.add(merged)
        for w, syms in words.items():
            out = []
            k = 0
            while k < len(syms):
                if k + 1 < len(syms) and syms[k] == a and syms[k + 1] == b:
                    out.append(merged)
                    k += 2
                else:
                    out.append(syms[k])
                    k += 1
            words[w] = out
    return merges


def build_vocab_and_merges(num_merges: int = DEFAULT_NUM_MERGES):
    byte_encoder = bytes_to_unicode()
    chars = list(byte_encoder.values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges = learn_bpe(build_corpus(), num_merges, byte_encoder, set(vocab_list))
    vocab_list += [a + b for a, b in merges]
    vocab_list += [BOS, EOS]
    assert len(set(vocab_list)) == len(vocab_list), "duplicate vocab entries"
    vocab = {t: i for i, t in enumerate(vocab_list)}
    return vocab, merges


# --------------------------------------------------------------------------------------------
# Reference implementation of the original CLIP tokenizer algorithm (OpenAI simple_tokenizer,
# transformers<5 slow CLIPTokenizer) as transformers applies it: NFC, whitespace collapse, lower-case,
# CLIP regex, byte-level mapping, rank-ordered BPE with `</w>` on the last symbol of each word.
# --------------------------------------------------------------------------------------------
class ClassicClipBpe:
    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        self.encoder = vocab
        self.byte_encoder = bytes_to_unicode()
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {BOS: BOS, EOS: EOS}

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        # NB: OpenAI's original also runs ftfy.fix_text + html.unescape twice; transformers'
        # tokenizer (what the diffusers pipeline uses) does neither, only NFC, so neither do we.
        text = unicodedata.normalize("NFC", text)
        text = regex.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for tok in PAT.findall(text):
            tok = "".join(self.byte_encoder[b] for b in tok.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(tok).split(" "))
        return ids

    def sd_input_ids(self, text: str, max_length: int = MODEL_MAX_LENGTH) -> list[int]:
        """What SD feeds the text encoder: BOS + ids (truncated) + EOS, padded with EOS."""
        ids = [self.encoder[BOS]] + self.encode(text)[: max_length - 2] + [self.encoder[EOS]]
        return ids + [self.encoder[EOS]] * (max_length - len(ids))


# --------------------------------------------------------------------------------------------
# Writing the folder
# --------------------------------------------------------------------------------------------
def _added(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_raw_files(out_dir: str, vocab: dict[str, int], merges: list[tuple[str, str]]):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")


def write_special_tokens_map(out_dir: str):
    # Same content as runwayml/stable-diffusion-v1-5/tokenizer/special_tokens_map.json
    stm = {"bos_token": _added(BOS), "eos_token": _added(EOS), "pad_token": EOS, "unk_token": _added(EOS)}
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(stm, f, indent=2)
        f.write("\n")


def load_tokenizer(folder: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder)


def build_tokenizer(out_dir: str, num_merges: int = DEFAULT_NUM_MERGES, verbose: bool = True):
    """Create the tokenizer folder; returns (fast_tokenizer, vocab, merges)."""
    import tempfile

    from transformers import CLIPTokenizer, CLIPTokenizerFast

    vocab, merges = build_vocab_and_merges(num_merges)
    with tempfile.TemporaryDirectory() as tmp:
        write_raw_files(tmp, vocab, merges)
        vf, mf = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
        common = dict(model_max_length=MODEL_MAX_LENGTH, pad_token=EOS)
        try:  # transformers < 5 signature
            slow = CLIPTokenizer(vf, mf, **common)
        except TypeError:
            slow = None
        if slow is None or not hasattr(slow, "get_vocab") or len(slow.get_vocab()) != len(vocab):
            slow = CLIPTokenizer.from_pretrained(tmp, **common)
        try:
            fast = CLIPTokenizerFast(vf, mf, **common)
        except TypeError:
            fast = None
        if fast is None or len(fast.get_vocab()) != len(vocab):
            fast = CLIPTokenizerFast.from_pretrained(tmp, **common)

    os.makedirs(out_dir, exist_ok=True)
    slow.save_pretrained(out_dir)
    fast.save_pretrained(out_dir)
    # Make the folder complete and canonical regardless of what save_pretrained wrote
    # (transformers >= 5 writes only tokenizer.json + tokenizer_config.json).
    write_raw_files(out_dir, vocab, merges)
    write_special_tokens_map(out_dir)
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    cfg = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
    cfg.update(
        {
            "model_max_length": MODEL_MAX_LENGTH,
            "bos_token": BOS,
            "eos_token": EOS,
            "unk_token": EOS,
            "pad_token": EOS,
            "tokenizer_class": "CLIPTokenizer",
            "do_lower_case": True,
            "add_prefix_space": False,
            "errors": "replace",
        }
    )
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")

    # Reload from the folder, and also from the raw files only, and cross-check.
    tok = CLIPTokenizerFast.from_pretrained(out_dir)
    tok_slow = CLIPTokenizer.from_pretrained(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        write_raw_files(tmp, vocab, merges)
        tok_raw = CLIPTokenizer.from_pretrained(tmp, model_max_length=MODEL_MAX_LENGTH, pad_token=EOS)
    classic = ClassicClipBpe(vocab, merges)
    assert len(tok) == len(vocab), (len(tok), len(vocab))
    assert tok.bos_token_id == vocab[BOS] and tok.eos_token_id == vocab[EOS] and tok.pad_token_id == vocab[EOS]
    assert tok.model_max_length == MODEL_MAX_LENGTH
    mismatches = []
    for p in tokenizer_case_prompts():
        ref = classic.sd_input_ids(p)
        for name, t in (("fast", tok), ("slow", tok_slow), ("raw-files", tok_raw)):
            got = t(p, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True).input_ids
            if got != ref:
                mismatches.append((name, p, got, ref))
    if mismatches:
        for m in mismatches:
            print("MISMATCH", m, file=sys.stderr)
        raise SystemExit("transformers tokenizer disagrees with the classic CLIP BPE reference")
    if verbose:
        print(f"tokenizer: vocab size {len(vocab)} ({len(merges)} merges), bos {vocab[BOS]}, eos/pad {vocab[EOS]}")
        print("files:", sorted(os.listdir(out_dir)))
        print("example:", p_demo := "a small red circle at the top left on a white background")
        print("  tokens:", tok.tokenize(p_demo))
        print("  ids   :", classic.encode(p_demo))
    return tok, vocab, merges


def tokenizer_case_prompts() -> list[str]:
    long_words = []
    k = 0
    while len(long_words) < 120:
        long_words += [SIZES[k % 5], COLOURS[k % 12], SHAPES[k % 6], "on", "the", VPOS[k % 4]]
        k += 1
    return [
        "a small red circle at the top left on a white background",
        "",
        "A Photo of an OLD Man, smiling!! (portrait)",
        "3 blue stars and 12 green squares, 2024 edition",
        "café au lait, naïve résumé",
        "  multiple   spaces\tand\nnewlines  ",
        "the doctor's nurse; don't panic?! it'll be ok",
        "hello 🙂 world — xylophone qüartz &amp; friends",
        " ".join(long_words[:120]),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "models", "tiny-random", "tokenizer"))
    ap.add_argument("--merges", type=int, default=DEFAULT_NUM_MERGES)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    build_tokenizer(os.path.normpath(args.out), args.merges)


if __name__ == "__main__":
    main()
