"""Test helpers for T5: a small T5-style SentencePiece model trained on the spot and HF tokenizer folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# Caption-like sentences plus accented, CJK and compatibility characters, so the model's normalisation table
# and its unknown-character path both matter.
_CORPUS = (
    "A person in a red jacket walks along the beach at sunset.\n"
    "The woman dances gracefully in a bright studio with white walls.\n"
    "A man wearing glasses stands in front of a brick building, smiling.\n"
    "Children play football on green grass under a blue sky.\n"
    "Café, naïve, résumé: unicode words 東京, Straße, ﬁne, ①, Ⅸ.\n"
    "The quick brown fox jumps over the lazy dog. Numbers 12345 and 3.14!\n"
) * 20

EXTRA_IDS = 100


def train_t5_spiece(folder: Path) -> Path:
    """A ~100-piece Unigram model with T5's layout (<pad>=0, </s>=1, <unk>=2, no <s>, NFKC): folder/spiece.model."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.splitlines()),
        model_prefix=str(folder / "spiece"),
        vocab_size=120,
        hard_vocab_limit=False,  # the corpus is too small for exactly 120 pieces
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=0.98,  # leaves rare characters unknown
        normalization_rule_name="nmt_nfkc",
        minloglevel=2,
    )
    (folder / "spiece.vocab").unlink()
    return folder / "spiece.model"


def write_t5_tokenizer_folder(folder: Path, spiece: Path, *, kind: str = "spiece") -> Path:
    """A HF `tokenizer/` folder as CogVideoX ships it: spiece.model + tokenizer_config.json (kind="spiece"),
    or transformers' own tokenizer.json conversion of it without the model file (kind="json")."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(spiece, folder / "spiece.model")
    config = {
        "tokenizer_class": "T5Tokenizer",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "extra_ids": EXTRA_IDS,
        "additional_special_tokens": [f"<extra_id_{i}>" for i in range(EXTRA_IDS)],
        "legacy": True,
        "model_max_length": 226,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if kind == "json":
        import transformers

        transformers.T5Tokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))
        (folder / "spiece.model").unlink(missing_ok=True)
        assert (folder / "tokenizer.json").is_file()
    elif kind != "spiece":
        raise ValueError(f"kind {kind!r}")
    return folder
