"""CLIPTokenizer against transformers' CLIPTokenizer, both reading the same small vocab.json/merges.txt."""

import re

import numpy as np
import pytest
import transformers
from oracle import write_tokenizer

from xdyna_jax.conditioning.clip_tokenizer import CLIPTokenizer

SENTENCES = [
    "",
    "a photo of a cat",
    "Hello the cat and  photo!!",
    "THE STARS, In CAPS",
    "multiple    spaces\tand\nnew\r\nlines",
    "  leading and trailing  ",
    "numbers 1999 and 3.14, 42% or -7",
    "they're here, it's fine; we'd've said I'M ok",
    "café crème brûlée naïve Ångström",
    "cafe\u0301 decomposed",  # NFC composes it to café
    'punctuation... (brackets) [x] {y} "quotes" -- dash_underscore @#$',
    "aaaa aaa aa a hellllo",
    "hello<|endoftext|>cat <|startoftext|>",
    "<|STARTOFTEXT|> matches bos only where the folder marks it normalized",
    "emoji 🙂 and 日本語",
    "a\u00a0non-breaking\u3000space",
    "the stars " * 60,  # truncated to 75 content tokens
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_tokenizers")
    return {
        "sd15": write_tokenizer(root / "sd15"),
        "bare": write_tokenizer(root / "bare", sd15_configs=False),
        "pad_bang": write_tokenizer(root / "pad_bang", pad_token="!"),  # SD 2.x pads with "!"
    }


def oracle(folder, texts, max_length):
    ref = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    return ref(texts, padding="max_length", truncation=True, max_length=max_length)["input_ids"]


@pytest.mark.parametrize("name", ["sd15", "bare", "pad_bang"])
@pytest.mark.parametrize("max_length", [77, 12])
def test_ids_match_transformers(folders, name, max_length):
    tok = CLIPTokenizer.from_folder(folders[name])
    got = tok(SENTENCES, max_length=max_length)
    assert got.dtype == np.int32 and got.shape == (len(SENTENCES), max_length)
    expected = np.asarray(oracle(folders[name], SENTENCES, max_length), dtype=np.int32)
    for text, g, e in zip(SENTENCES, got, expected, strict=True):
        np.testing.assert_array_equal(g, e, err_msg=repr(text))


def test_folder_settings(folders):
    sd15 = CLIPTokenizer.from_folder(folders["sd15"])
    assert sd15.model_max_length == 77 and sd15.pad_token_id == sd15.eos_token_id
    assert sd15("a cat").shape == (1, 77)  # a single string is a batch of one; default length from the folder
    assert CLIPTokenizer.from_folder(folders["pad_bang"]).pad_token_id == 0
    assert CLIPTokenizer.from_folder(folders["bare"]).model_max_length == 77  # no config: CLIP's context


def test_merges_apply_in_rank_order(folders):
    tok = CLIPTokenizer.from_folder(folders["bare"])
    inverse = {i: t for t, i in tok.vocab.items()}
    # "h e" outranks "l l", so "h ell" never applies to "hello".
    expected = "he llo</w> ,</w> the</w> cat</w> 's</w> photo</w>".split()
    assert [inverse[i] for i in tok.encode("Hello, the cat's photo")] == expected
    # "a a" joins left to right without overlap; "aa a</w>" then needs an "aa" right before "a</w>".
    assert [inverse[i] for i in tok.encode("aaaa aaa café")] == ["aa", "a", "a</w>", "aaa</w>", "cafÃ©</w>"]


def test_missing_files_are_reported(tmp_path, folders):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CLIPTokenizer.from_folder(tmp_path / "nowhere")
    for name in ("vocab.json", "merges.txt"):
        folder = write_tokenizer(tmp_path / f"no_{name}")
        (folder / name).unlink()
        with pytest.raises(FileNotFoundError, match=name):
            CLIPTokenizer.from_folder(folder)


def test_bad_files_are_reported(tmp_path):
    folder = write_tokenizer(tmp_path / "bad_merge")
    (folder / "merges.txt").write_text("#version: 0.2\nq z\n")  # "qz" is no vocabulary entry
    with pytest.raises(ValueError, match="bad_merge.*merges.txt unreadable.*qz"):
        CLIPTokenizer.from_folder(folder)
    (folder / "merges.txt").write_text("#version: 0.2\nt h e\n")
    with pytest.raises(ValueError, match="merges.txt unreadable.*line"):
        CLIPTokenizer.from_folder(folder)
    (folder / "vocab.json").write_text("{not json")
    with pytest.raises(ValueError, match="vocab.json"):
        CLIPTokenizer.from_folder(folder)
    folder = write_tokenizer(tmp_path / "bad_special", pad_token="<|pad|>")
    with pytest.raises(ValueError, match=re.escape("pad_token '<|pad|>' is not in the vocabulary")):
        CLIPTokenizer.from_folder(folder)
    with pytest.raises(ValueError, match="max_length"):
        CLIPTokenizer.from_folder(write_tokenizer(tmp_path / "ok"))("x", max_length=1)
