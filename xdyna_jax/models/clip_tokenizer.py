"""CLIP's byte-level BPE tokenizer, read from a user's folder (SD 1.5's `tokenizer/`), in plain Python.

Reproduces transformers 5's `CLIPTokenizer` (a `tokenizers` pipeline) called as Stable Diffusion calls it,
`tokenizer(texts, padding="max_length", truncation=True, max_length=77)`:
  1. special tokens written literally in the text (`<|endoftext|>`...) are cut out first and kept as ids;
  2. normalise: Unicode NFC, every whitespace run -> one space, lowercase (no ftfy "fix_text" step:
     transformers 5 has none either);
  3. split into words with CLIP's regex (contractions, letter runs, single digits, punctuation runs;
     whitespace dropped), then GPT-2's byte-level regex inside each word (it only splits a literal but
     differently-cased special token such as `<|ENDOFTEXT|>`);
  4. map each word's UTF-8 bytes to GPT-2's printable byte alphabet, mark the last symbol with `</w>`
     and apply the merges in rank order;
  5. wrap in bos/eos, truncate the content to max_length - 2, pad with the pad token.
Known difference: transformers also recognises `<|startoftext|>` written in another case (its AddedToken is
"normalized" in SD 1.5's config); here only the exact spelling is special.
"""

from __future__ import annotations

import functools
import json
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import regex

# The pre-tokenizer regex of CLIP (and of transformers' CLIPTokenizer); the text is already lowercase.
_CLIP_WORDS = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"""
)
# GPT-2's regex, applied by the byte-level step inside each CLIP word.
_BYTE_LEVEL_WORDS = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
_WHITESPACE = regex.compile(r"\s+")
_END_OF_WORD = "</w>"
_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
# CLIP's context length; used when the folder does not state model_max_length.
DEFAULT_MAX_LENGTH = 77
_CACHE_LIMIT = 10_000


@functools.cache
def byte_alphabet() -> tuple[str, ...]:
    """GPT-2's reversible byte -> character table (index = byte value).

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, NBSP, soft hyphen) get
    U+0100 onwards, so no BPE symbol is whitespace or a control character.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    for i, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(0x100 + i)
    return tuple(table[b] for b in range(256))


class CLIPTokenizer:
    """texts -> int32 ids (B, max_length): `<|startoftext|>` content `<|endoftext|>` pad...

    vocab: token -> id (vocab.json); merges: BPE pairs in rank order (merges.txt). Build it with
    `CLIPTokenizer.from_folder(path)`.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        bos_token: str = "<|startoftext|>",
        eos_token: str = "<|endoftext|>",
        pad_token: str = "<|endoftext|>",
        unk_token: str = "<|endoftext|>",
        model_max_length: int = DEFAULT_MAX_LENGTH,
    ):
        self.vocab = dict(vocab)
        for name, token in zip(_SPECIAL_KEYS, (bos_token, eos_token, pad_token, unk_token), strict=True):
            if token not in self.vocab:
                raise ValueError(f"CLIPTokenizer: {name} {token!r} is not in the vocabulary")
        for a, b in merges:
            # A merge must produce a known token, otherwise its result could not be emitted (tokenizers
            # refuses such files too).
            if a + b not in self.vocab:
                raise ValueError(
                    f"CLIPTokenizer: merge {a!r} + {b!r} gives {a + b!r}, which is not in the vocabulary"
                )
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.bos_token_id = self.vocab[bos_token]
        self.eos_token_id = self.vocab[eos_token]
        self.pad_token_id = self.vocab[pad_token]
        self.unk_token_id = self.vocab[unk_token]
        self.model_max_length = model_max_length
        specials = sorted({bos_token, eos_token, pad_token, unk_token}, key=len, reverse=True)
        # A capturing group makes `split` return the special tokens at the odd positions.
        self._specials = regex.compile("(" + "|".join(regex.escape(t) for t in specials) + ")")
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_folder(cls, path: str | Path) -> CLIPTokenizer:
        """Read vocab.json + merges.txt (+ tokenizer_config.json / special_tokens_map.json if present)."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"tokenizer folder {str(folder)!r} does not exist (expected e.g. SD 1.5's tokenizer/ folder "
                "with vocab.json and merges.txt)"
            )
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"tokenizer folder {str(folder)!r} has no {name} (CLIP BPE needs it)")
        vocab = _read_json(folder / "vocab.json")
        merges = _read_merges(folder / "merges.txt")

        settings: dict = {}
        config = (
            _read_json(folder / "tokenizer_config.json")
            if (folder / "tokenizer_config.json").is_file()
            else {}
        )
        sources = [config]
        # As in transformers: special_tokens_map.json overrides the config unless the config is the newer
        # kind that lists its tokens in added_tokens_decoder.
        if (folder / "special_tokens_map.json").is_file() and "added_tokens_decoder" not in config:
            sources.append(_read_json(folder / "special_tokens_map.json"))
        for source in sources:
            for key in _SPECIAL_KEYS:
                if source.get(key) is not None:
                    value = source[key]
                    settings[key] = value["content"] if isinstance(value, dict) else str(value)
        length = config.get("model_max_length")
        # transformers writes ~1e30 for "no limit"; CLIP cannot see past its 77 positions anyway.
        if isinstance(length, int | float) and 2 <= length <= 1_000_000:
            settings["model_max_length"] = int(length)
        return cls(vocab, merges, **settings)

    # ------------------------------------------------------------------------------------------- encode

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without bos/eos and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"CLIPTokenizer: expected a string, got {type(text).__name__}")
        ids: list[int] = []
        for i, part in enumerate(self._specials.split(text)):
            if i % 2:  # a literal special token
                ids.append(self.vocab[part])
                continue
            part = unicodedata.normalize("NFC", part)
            part = _WHITESPACE.sub(" ", part).lower()
            for clip_word in _CLIP_WORDS.findall(part):
                for word in _BYTE_LEVEL_WORDS.findall(clip_word):
                    ids.extend(self._word_ids(word))
        return ids

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
        """Ids (B, max_length) int32 (B = 1 for a single string); max_length defaults to model_max_length.

        Too long prompts keep their first max_length - 2 tokens, then `<|endoftext|>`, like transformers'
        `truncation=True`.
        """
        batch = [texts] if isinstance(texts, str) else list(texts)
        n = self.model_max_length if max_length is None else max_length
        if n < 2:
            raise ValueError(f"CLIPTokenizer: max_length must leave room for bos and eos, got {n}")
        out = np.full((len(batch), n), self.pad_token_id, dtype=np.int32)
        for row, text in zip(out, batch, strict=True):
            ids = [self.bos_token_id, *self.encode(text)[: n - 2], self.eos_token_id]
            row[: len(ids)] = ids
        return out

    def _word_ids(self, word: str) -> list[int]:
        if word not in self._cache:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            alphabet = byte_alphabet()
            symbols = self._bpe([alphabet[b] for b in word.encode("utf-8")])
            # Symbols outside the vocabulary can only come from a vocabulary lacking byte characters.
            self._cache[word] = [self.vocab.get(s, self.unk_token_id) for s in symbols]
        return self._cache[word]

    def _bpe(self, symbols: list[str]) -> list[str]:
        """Apply merges to one word: repeatedly join every occurrence of the best-ranked adjacent pair."""
        symbols = [*symbols[:-1], symbols[-1] + _END_OF_WORD]
        while len(symbols) > 1:
            rank, best = min(
                (self.ranks.get(pair, np.inf), pair) for pair in zip(symbols, symbols[1:], strict=False)
            )
            if rank == np.inf:
                break
            merged, i = [], 0
            while i < len(symbols):  # left to right, so "a a a" with merge "a a" becomes "aa a"
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"could not read {str(path)!r}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} should hold a JSON object")
    return data


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt: an optional `#version` header, then one `left right` pair per line in rank order."""
    merges = []
    # Split on "\n" only: str.splitlines would also break on rarer separators.
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.startswith("#version") or not line:
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{str(path)!r} line {n}: expected two space-separated symbols, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges
