"""CLIP's byte-level BPE tokenizer, built with the `tokenizers` library from a user's vocab.json + merges.txt.

The pipeline is the one transformers' `CLIPTokenizer` assembles, called as Stable Diffusion calls it,
`tokenizer(texts, padding="max_length", truncation=True, max_length=77)`:
  normalise (Unicode NFC, every whitespace run -> one space, lowercase); split into CLIP's words
  (contractions, letter runs, single digits, punctuation runs; whitespace dropped), then byte-level
  (GPT-2's byte alphabet and word regex) inside each word; BPE with `</w>` marking a word's last symbol;
  wrap in bos/eos; keep the first max_length - 2 content tokens; pad with the pad token.
Special tokens written in the text (`<|endoftext|>`...) stay single ids. Which of them also match in another
case follows the folder's settings as transformers reads them (see `_special_tokens`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

# CLIP's word pattern, applied to the already lowercased text.
_CLIP_WORDS = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# The order in which transformers registers special tokens: a later entry redefines an earlier one with
# the same text (SD 1.5 names "<|endoftext|>" as eos, unk and pad).
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_DEFAULTS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
# CLIP's context length; used when the folder does not state model_max_length.
DEFAULT_MAX_LENGTH = 77


class CLIPTokenizer:
    """texts -> int32 ids (B, max_length): `<|startoftext|>` content `<|endoftext|>` pad...

    Build it with `CLIPTokenizer.from_folder(path)` (SD 1.5's `tokenizer/` folder). `specials` maps each
    role (bos_token, eos_token, unk_token, pad_token) to its text and whether it also matches the
    normalised (lowercased) text.
    """

    def __init__(
        self,
        model: BPE,
        specials: dict[str, tuple[str, bool]],
        *,
        model_max_length: int = DEFAULT_MAX_LENGTH,
    ):
        tokenizer = Tokenizer(model)
        for key, (token, _) in specials.items():
            if tokenizer.token_to_id(token) is None:
                # tokenizers would append an unknown special token with a fresh id the text encoder lacks.
                raise ValueError(f"CLIPTokenizer: {key} {token!r} is not in the vocabulary")
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_CLIP_WORDS), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        # One definition per text, the last role naming it deciding whether it matches normalised text.
        flags = {token: normalized for token, normalized in specials.values()}
        tokenizer.add_special_tokens(
            [AddedToken(token, normalized=normalized, special=True) for token, normalized in flags.items()]
        )
        self.bos_token_id, self.eos_token_id, self.unk_token_id, self.pad_token_id = (
            tokenizer.token_to_id(specials[key][0]) for key in _SPECIAL_KEYS
        )
        tokenizer.post_processor = processors.RobertaProcessing(
            (specials["eos_token"][0], self.eos_token_id),
            (specials["bos_token"][0], self.bos_token_id),
            trim_offsets=False,
            add_prefix_space=False,
        )
        self._tokenizer = tokenizer
        self._pad_token = specials["pad_token"][0]
        self.model_max_length = model_max_length
        self._fixed_length: dict[int, Tokenizer] = {}

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
        try:
            model = BPE.from_file(
                str(folder / "vocab.json"),
                str(folder / "merges.txt"),
                unk_token=None,  # set below, once the folder's settings are known
                continuing_subword_prefix="",
                end_of_word_suffix="</w>",
                fuse_unk=False,
            )
        except Exception as e:  # tokenizers raises a bare Exception naming the problem, not the folder
            raise ValueError(
                f"tokenizer folder {str(folder)!r}: vocab.json / merges.txt unreadable: {e}"
            ) from e

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
        specials = _special_tokens(sources)
        model.unk_token = specials["unk_token"][0]
        settings = {}
        length = config.get("model_max_length")
        # transformers writes ~1e30 for "no limit"; CLIP cannot see past its 77 positions anyway.
        if isinstance(length, int | float) and 2 <= length <= 1_000_000:
            settings["model_max_length"] = int(length)
        return cls(model, specials, **settings)

    @property
    def vocab(self) -> dict[str, int]:
        """token -> id, special tokens included."""
        return self._tokenizer.get_vocab()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without bos/eos and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"CLIPTokenizer: expected a string, got {type(text).__name__}")
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
        """Ids (B, max_length) int32 (B = 1 for a single string); max_length defaults to model_max_length.

        Too long prompts keep their first max_length - 2 tokens, then `<|endoftext|>`, like transformers'
        `truncation=True`.
        """
        batch = [texts] if isinstance(texts, str) else list(texts)
        for text in batch:
            if not isinstance(text, str):
                raise TypeError(f"CLIPTokenizer: expected strings, got {type(text).__name__}")
        n = self.model_max_length if max_length is None else max_length
        if n < 2:
            raise ValueError(f"CLIPTokenizer: max_length must leave room for bos and eos, got {n}")
        encodings = self._with_length(n).encode_batch(batch)
        return np.array([e.ids for e in encodings], dtype=np.int32).reshape(len(batch), n)

    def _with_length(self, n: int) -> Tokenizer:
        """A copy that truncates and pads to n, so `encode` and other lengths stay unaffected."""
        if n not in self._fixed_length:
            fixed = Tokenizer.from_str(self._tokenizer.to_str())
            fixed.enable_truncation(n)  # counts the bos/eos the post-processor adds
            fixed.enable_padding(length=n, pad_id=self.pad_token_id, pad_token=self._pad_token)
            self._fixed_length[n] = fixed
        return self._fixed_length[n]


def _special_tokens(sources: Sequence[dict]) -> dict[str, tuple[str, bool]]:
    """role -> (text, normalized) from the folder's configs, as transformers reads them.

    A role written as a dict keeps its "normalized" flag; a plain string (or a default) matches only its
    exact spelling. In SD 1.5's folder bos is a normalised dict, so `<|STARTOFTEXT|>` also counts as bos.
    """
    specials = {key: (token, False) for key, token in _DEFAULTS.items()}
    for source in sources:
        for key in _SPECIAL_KEYS:
            value = source.get(key)
            if isinstance(value, dict) and "content" in value:
                specials[key] = (str(value["content"]), bool(value.get("normalized", False)))
            elif value is not None:
                specials[key] = (str(value), False)
    return specials


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"could not read {str(path)!r}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} should hold a JSON object")
    return data
