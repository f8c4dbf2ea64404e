"""T5's SentencePiece tokenizer (CogVideoX / DynamiCtrl prompts), from a user's spiece.model or tokenizer.json.

The result is the one transformers' `T5Tokenizer` gives when called as the CogVideoX pipeline calls it,
`tokenizer(prompts, padding="max_length", max_length=226, truncation=True, add_special_tokens=True)`:
  special tokens written in the text (`<pad>`, `</s>`, `<unk>`, the sentinels `<extra_id_N>`) become their
  single ids and split the text into pieces; each piece is normalised (the model's NFKC table) and
  tokenised on its own with a `▁` word-start mark in front of every word; the first max_length - 1 ids are
  kept and `</s>` appended; `<pad>` fills the rest. The mask is 1 on the ids and `</s>`, 0 on the padding.

Two engines give the same ids:
  - `from_spiece`: the `sentencepiece` library runs the model file (T5's original format; the release ships
    it). The sentinel ids are not in the file: T5 appends them after its pieces, `<extra_id_0>` last.
  - `from_tokenizer_json`: the `tokenizers` library, with the file's Unigram vocabulary, added tokens and
    normalisation table, and T5's word splitting (as transformers rebuilds the same file).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors

# The CogVideoX pipeline's text length (max_text_seq_length of its transformer).
DEFAULT_MAX_LENGTH = 226
# T5's sentinel count (transformers' `extra_ids` default).
DEFAULT_EXTRA_IDS = 100
_DEFAULTS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
_WORD_MARK = "▁"


class T5Tokenizer:
    """prompts -> (input_ids, attention_mask), both int32 (B, max_length).

    Build it with `from_folder` (a HF `tokenizer/` folder), `from_spiece` or `from_tokenizer_json`.
    """

    def __init__(
        self,
        *,
        pad_token_id: int,
        eos_token_id: int,
        unk_token_id: int,
        vocab_size: int,
        sentencepiece: spm.SentencePieceProcessor | None = None,
        specials: dict[str, int] | None = None,
        tokenizer: Tokenizer | None = None,
    ):
        """Use the constructors; exactly one engine (`sentencepiece` with its `specials`, or `tokenizer`)."""
        if (sentencepiece is None) == (tokenizer is None):
            raise ValueError(
                "T5Tokenizer needs exactly one of a sentencepiece model or a tokenizers Tokenizer"
            )
        self.pad_token_id, self.eos_token_id, self.unk_token_id = pad_token_id, eos_token_id, unk_token_id
        self.vocab_size = vocab_size
        self._sp = sentencepiece
        self._specials = dict(specials or {})
        # Longest first, so a special token that contains another wins (leftmost-longest, as tokenizers).
        alternatives = sorted(self._specials, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None
        self._tokenizer = tokenizer
        self._fixed_length: dict[int, Tokenizer] = {}

    # ---------------------------------------------------------------- constructors

    @classmethod
    def from_spiece(
        cls,
        path: str | Path,
        *,
        extra_ids: int = DEFAULT_EXTRA_IDS,
        additional_special_tokens: Sequence[str] = (),
        pad_token: str = _DEFAULTS["pad_token"],
        eos_token: str = _DEFAULTS["eos_token"],
        unk_token: str = _DEFAULTS["unk_token"],
    ) -> T5Tokenizer:
        """A SentencePiece model file (spiece.model) run by the `sentencepiece` library.

        `<extra_id_0>` ... `<extra_id_{extra_ids-1}>` get the ids after the file's pieces, in reverse order.
        Every token in `additional_special_tokens` must be one of those or a piece of the model.
        """
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"T5 tokenizer: SentencePiece model {str(file)!r} does not exist")
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(str(file))
        except Exception as e:  # sentencepiece raises OSError / RuntimeError with its own wording
            raise ValueError(f"T5 tokenizer: {str(file)!r} is not a readable SentencePiece model: {e}") from e
        if extra_ids < 0:
            raise ValueError(f"T5 tokenizer: extra_ids must be >= 0, got {extra_ids}")
        pieces = processor.get_piece_size()
        ids: dict[str, int] = {}
        for role, token in (("pad_token", pad_token), ("eos_token", eos_token), ("unk_token", unk_token)):
            token_id = processor.piece_to_id(token)
            if processor.id_to_piece(token_id) != token:  # piece_to_id answers unk for an unknown piece
                raise ValueError(f"T5 tokenizer: {str(file)!r} has no piece {token!r} for its {role}")
            ids[token] = token_id
        for i in range(extra_ids):
            ids.setdefault(f"<extra_id_{i}>", pieces + extra_ids - 1 - i)
        for token in additional_special_tokens:
            if token in ids:
                continue
            token_id = processor.piece_to_id(token)
            if processor.id_to_piece(token_id) != token:
                raise ValueError(
                    f"T5 tokenizer: additional special token {token!r} is neither a sentinel "
                    f"(<extra_id_0>..<extra_id_{extra_ids - 1}>) nor a piece of {str(file)!r}"
                )
            ids[token] = token_id
        return cls(
            pad_token_id=ids[pad_token],
            eos_token_id=ids[eos_token],
            unk_token_id=ids[unk_token],
            vocab_size=pieces + extra_ids,
            sentencepiece=processor,
            specials=ids,
        )

    @classmethod
    def from_tokenizer_json(
        cls,
        path: str | Path,
        *,
        extra_ids: int = DEFAULT_EXTRA_IDS,
        additional_special_tokens: Sequence[str] = (),
        pad_token: str = _DEFAULTS["pad_token"],
        eos_token: str = _DEFAULTS["eos_token"],
        unk_token: str = _DEFAULTS["unk_token"],
    ) -> T5Tokenizer:
        """A tokenizers serialisation (tokenizer.json) of a T5 Unigram model, run by `tokenizers`.

        Kept from the file: the vocabulary, its added tokens and the SentencePiece normalisation table.
        Replaced, as transformers' T5Tokenizer replaces them: the word splitting (whitespace, then `▁` in
        front of every word) and the post-processing (`</s>` appended). The special tokens must be in it.
        """
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"T5 tokenizer: tokenizer file {str(file)!r} does not exist")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
            tokenizer = Tokenizer.from_str(json.dumps(data))
        except Exception as e:  # json / tokenizers errors name neither the file nor the problem's place
            raise ValueError(f"T5 tokenizer: {str(file)!r} is not a readable tokenizer.json: {e}") from e
        kind = data.get("model", {}).get("type")
        if kind != "Unigram":
            raise ValueError(
                f"T5 tokenizer: {str(file)!r} holds a {kind} model; T5 uses a Unigram (SentencePiece) one"
            )
        charsmap = _precompiled_charsmap(data.get("normalizer"))
        tokenizer.normalizer = normalizers.Precompiled(charsmap) if charsmap is not None else None
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.WhitespaceSplit(),
                pre_tokenizers.Metaspace(replacement=_WORD_MARK, prepend_scheme="always", split=True),
            ]
        )
        tokenizer.no_truncation()
        tokenizer.no_padding()
        sentinels = [f"<extra_id_{i}>" for i in range(extra_ids)]
        ids = {}
        for token in (pad_token, eos_token, unk_token, *sentinels, *additional_special_tokens):
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                # tokenizers would give an unknown special token a fresh id the text encoder lacks
                raise ValueError(f"T5 tokenizer: {str(file)!r} has no token {token!r}")
            ids[token] = token_id
        # special=True: the text's own spelling of a special token maps to its id, never to pieces
        tokenizer.add_special_tokens(list(ids))
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"$A {eos_token}",
            pair=f"$A {eos_token} $B {eos_token}",
            special_tokens=[(eos_token, ids[eos_token])],
        )
        return cls(
            pad_token_id=ids[pad_token],
            eos_token_id=ids[eos_token],
            unk_token_id=ids[unk_token],
            vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
            tokenizer=tokenizer,
        )

    @classmethod
    def from_folder(cls, path: str | Path) -> T5Tokenizer:
        """A HF `tokenizer/` folder: spiece.model (preferred: T5's original file) or tokenizer.json, with
        the special tokens and sentinel count of tokenizer_config.json / special_tokens_map.json if present."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"tokenizer folder {str(folder)!r} does not exist (expected a T5 tokenizer/ folder with "
                "spiece.model or tokenizer.json)"
            )
        settings = _folder_settings(folder)
        if (folder / "spiece.model").is_file():
            return cls.from_spiece(folder / "spiece.model", **settings)
        if (folder / "tokenizer.json").is_file():
            return cls.from_tokenizer_json(folder / "tokenizer.json", **settings)
        raise FileNotFoundError(
            f"tokenizer folder {str(folder)!r} has neither spiece.model nor tokenizer.json"
        )

    # ---------------------------------------------------------------- encoding

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without `</s>` and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"T5Tokenizer: expected a string, got {type(text).__name__}")
        if self._tokenizer is not None:
            return self._tokenizer.encode(text, add_special_tokens=False).ids
        ids: list[int] = []
        start = 0
        for match in self._special_re.finditer(text) if self._special_re is not None else ():
            ids += self._sp.encode(text[start : match.start()])
            ids.append(self._specials[match.group()])
            start = match.end()
        return ids + self._sp.encode(text[start:])

    def __call__(
        self, prompts: str | Sequence[str], max_length: int = DEFAULT_MAX_LENGTH
    ) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask) int32 (B, max_length); B = 1 for a single string.

        A prompt longer than max_length - 1 ids keeps its first max_length - 1, then `</s>`.
        """
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        for text in batch:
            if not isinstance(text, str):
                raise TypeError(f"T5Tokenizer: expected strings, got {type(text).__name__}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(
                f"T5Tokenizer: max_length must be an int >= 1 (room for </s>), got {max_length!r}"
            )
        ids = np.full((len(batch), max_length), self.pad_token_id, np.int32)
        mask = np.zeros((len(batch), max_length), np.int32)
        if self._tokenizer is not None:
            for row, encoding in enumerate(self._with_length(max_length).encode_batch(batch)):
                ids[row], mask[row] = encoding.ids, encoding.attention_mask
            return ids, mask
        for row, text in enumerate(batch):
            tokens = self.encode(text)[: max_length - 1] + [self.eos_token_id]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return ids, mask

    def _with_length(self, n: int) -> Tokenizer:
        """A copy of the tokenizers engine that truncates and pads to n (`encode` stays unaffected)."""
        if n not in self._fixed_length:
            fixed = Tokenizer.from_str(self._tokenizer.to_str())
            fixed.enable_truncation(n)  # counts the </s> the post-processor adds
            fixed.enable_padding(
                length=n, pad_id=self.pad_token_id, pad_token=self._tokenizer.id_to_token(self.pad_token_id)
            )
            self._fixed_length[n] = fixed
        return self._fixed_length[n]


def _precompiled_charsmap(normalizer: dict | None) -> bytes | None:
    """The SentencePiece normalisation table a tokenizer.json carries (alone or inside a Sequence)."""
    if not normalizer:
        return None
    steps = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    for step in steps:
        if step.get("type") == "Precompiled" and step.get("precompiled_charsmap"):
            return base64.b64decode(step["precompiled_charsmap"])
    return None


def _token_text(value) -> str | None:
    """A special token as the configs write it: a string or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return None if value is None else str(value)


def _folder_settings(folder: Path) -> dict:
    """Special tokens and sentinel count from tokenizer_config.json, then special_tokens_map.json."""
    settings: dict = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if not (folder / name).is_file():
            continue
        config = _read_json(folder / name)
        for key in _DEFAULTS:
            token = _token_text(config.get(key))
            if token is not None:
                settings[key] = token
        extra = config.get("additional_special_tokens")
        if isinstance(extra, list):
            settings["additional_special_tokens"] = tuple(t for t in map(_token_text, extra) if t is not None)
        if "extra_ids" in config:
            if not isinstance(config["extra_ids"], int) or config["extra_ids"] < 0:
                raise ValueError(
                    f"{str(folder / name)!r}: extra_ids must be an int >= 0, got {config['extra_ids']!r}"
                )
            settings["extra_ids"] = config["extra_ids"]
    return settings


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"could not read {str(path)!r}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} should hold a JSON object")
    return data
