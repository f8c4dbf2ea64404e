"""A CLIP-style BPE tokenizer of our own, learnt from a fixed word list and run by the `tokenizers` library.

A model trained from scratch needs a tokenizer, and CLIP's vocabulary is not ours to ship. This one is
trained here, deterministically, on `WORDS` (a few hundred words about people, motion, colours and
scenes) with the same text pipeline `conditioning.clip_tokenizer.CLIPTokenizer` applies (NFC, whitespace
runs to one space, lowercase, CLIP's word pattern, GPT-2's byte alphabet, `</w>` on a word's last
symbol). It is written as the vocab.json + merges.txt + tokenizer_config.json folder that loader reads,
in CLIP's vocabulary order: the 256 byte symbols, their `</w>` forms (so any text encodes without an
unknown token), one entry per merge in merge order, then `<|startoftext|>` and `<|endoftext|>`.

    write_tokenizer_folder("bundles/x/tokenizer", vocab_size=768, model_max_length=8)
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from xdyna_jax.conditioning.clip_tokenizer import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's word pattern on lowercased text (as conditioning/clip_tokenizer.py splits it)
_WORDS_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)

# The training text: words a prompt about an animated character might use. Fixed here, so the tokenizer
# (and a text encoder trained with it) is the same on every machine.
WORDS = """
a an the and or with without of in on at to from by for over under near behind front back left right up
down person people man woman child dancer character figure body head face eyes eye mouth lips nose ear hair
neck shoulder shoulders arm arms elbow hand hands wrist finger fingers hip hips leg legs knee knees foot feet
ankle toe shoe shoes shirt dress skirt trousers jacket coat hat cap clothing pattern stripes dots checks
dance dances dancing dancer jump jumps jumping walk walks walking run runs running turn turns turning spin
spins spinning wave waves waving raise raises raising lift lifts lifting swing swings swinging step steps
stepping bend bends bending stretch stretches stretching kick kicks kicking clap claps clapping nod nods
smile smiles smiling blink blinks blinking open opens opening close closes closing sway sways swaying move
moves moving motion pose poses posing stand stands standing sit sits sitting slowly quickly smoothly gently
red orange yellow green blue purple pink brown black white grey gray gold silver dark light bright pale deep
colour colours color colors shade shaded shadow shadows
background scene sky cloud clouds drifting water sea ocean river lake wave rain snow particles falling leaves
grass plant plants tree trees flower flowers swaying wind sun moon star stars night day morning evening
field forest beach city street room stage wall floor garden park mountain hill road bridge window door light
video frame frames image picture photo animation animated cartoon synthetic world realistic high quality
best detailed simple clean soft sharp blurry still dynamic natural smooth loop
one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 . , ! ? ' - : ;
""".split()


def _pipeline(model: BPE) -> Tokenizer:
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_WORDS_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return tokenizer


def train_merges(words: list[str], max_merges: int) -> list[tuple[str, str]]:
    """BPE merges learnt from `words` (each word counted once), at most `max_merges`, in merge order.

    Written here rather than with `tokenizers.trainers.BpeTrainer`: that trainer breaks ties between
    equally frequent pairs by its hash maps' order, which changes from one process to the next, so the
    same words gave different merges (and a different tokenizer) on different runs. Here a tie goes to
    the lexicographically smallest pair. The words go through the tokenizer's own normaliser and
    pre-tokenizer (`tokenizers` still does all encoding); a pair must occur at least twice to be merged.
    """
    pipeline = _pipeline(BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    counts: Counter[str] = Counter()
    for word in words:
        for piece, _ in pipeline.pre_tokenizer.pre_tokenize_str(pipeline.normalizer.normalize_str(word)):
            counts[piece] += 1
    symbols = {piece: [*piece[:-1], piece[-1] + "</w>"] for piece in counts}
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for piece, n in counts.items():
            seq = symbols[piece]
            for pair in zip(seq[:-1], seq[1:], strict=True):
                pairs[pair] += n
        if not pairs:
            break
        best, n = min(pairs.items(), key=lambda item: (-item[1], item[0]))
        if n < 2:
            break
        merges.append(best)
        for piece, seq in symbols.items():
            out, k = [], 0
            while k < len(seq):
                if k + 1 < len(seq) and (seq[k], seq[k + 1]) == best:
                    out.append(seq[k] + seq[k + 1])
                    k += 2
                else:
                    out.append(seq[k])
                    k += 1
            symbols[piece] = out
    return merges


def clip_vocabulary(merges: list[tuple[str, str]]) -> dict[str, int]:
    """token -> id in CLIP's order (see the module docstring)."""
    base = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = base + [b + "</w>" for b in base]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def write_tokenizer_folder(
    folder: str | Path, *, vocab_size: int, model_max_length: int, words: list[str] | None = None
) -> Path:
    """Train the tokenizer on `words` (default WORDS) and write it to `folder` (created); its vocabulary
    has at most `vocab_size` entries (the text encoder's rows). Returns the folder, read back and checked
    by `CLIPTokenizer.from_folder`."""
    folder = Path(folder)
    fixed = 2 * len(pre_tokenizers.ByteLevel.alphabet()) + 2
    if vocab_size <= fixed:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for merges: the fixed part is {fixed}")
    if model_max_length < 2:
        raise ValueError(f"model_max_length must leave room for bos and eos, got {model_max_length}")
    merges = train_merges(list(WORDS if words is None else words), vocab_size - fixed)
    vocab = clip_vocabulary(merges)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "model_max_length": int(model_max_length),
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    tokenizer = CLIPTokenizer.from_folder(folder)
    if len(tokenizer.vocab) > vocab_size:
        raise ValueError(f"{folder}: {len(tokenizer.vocab)} tokens do not fit vocab_size {vocab_size}")
    return folder
