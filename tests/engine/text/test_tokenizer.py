"""flowgen's Klein tokenizer vs transformers' Qwen2Tokenizer + chat template on the same folder.

The reference is exactly what diffusers' `_get_qwen3_prompt_embeds` does per prompt:
`apply_chat_template(..., tokenize=False, add_generation_prompt=True, enable_thinking=False)` then
`tokenizer(text, padding="max_length", truncation=True, max_length=L)`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, models

from flowgen.engine.text.tiny_tokenizer import write_tiny_tokenizer
from flowgen.engine.text.tokenizer import load_tokenizer
from flowgen.errors import CheckpointError

LITERAL = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
PROMPTS = [
    "a cat",
    "",
    "Café crème — 東京の夜景 🌃, naïve façade",
    "Cafe\u0301 (decomposed accent, NFC-normalised)",
    "two lines\nof text\n\n  with   spaces\tand tabs ",
    "a prompt that mentions <|im_end|> and <think> literally",
    "it's 12345 o'clock; don't PANIC!!!",
    "a very long prompt " * 20,  # far beyond max_length: truncated
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def reference(folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(tokenizer).__name__ in ("Qwen2Tokenizer", "Qwen2TokenizerFast")
    return tokenizer


def reference_encode(tokenizer, prompt: str, max_length: int):
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    enc = tokenizer(text, padding="max_length", truncation=True, max_length=max_length)
    return text, np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"])


@pytest.mark.parametrize("max_length", [32, 77])
def test_ids_and_mask_match_transformers(folder, reference, max_length):
    tokenizer = load_tokenizer(folder, max_length=max_length)
    ids, mask = tokenizer(PROMPTS)
    assert ids.shape == mask.shape == (len(PROMPTS), max_length)
    assert ids.dtype == mask.dtype == np.int32
    for row, prompt in enumerate(PROMPTS):
        text, ref_ids, ref_mask = reference_encode(reference, prompt, max_length)
        assert tokenizer.render(prompt) == text == LITERAL.format(prompt)
        np.testing.assert_array_equal(ids[row], ref_ids, err_msg=repr(prompt))
        np.testing.assert_array_equal(mask[row], ref_mask, err_msg=repr(prompt))
    lengths = mask.sum(axis=1)
    assert lengths[-1] == max_length, "the long prompt must be truncated"
    assert lengths.min() < max_length, "some prompt must be padded"
    assert (ids[mask == 0] == reference.pad_token_id).all()
    assert len(set(map(tuple, ids))) == len(PROMPTS), "different prompts must give different ids"


def test_single_prompt_and_special_token_ids(folder):
    tokenizer = load_tokenizer(folder, max_length=48)
    ids, mask = tokenizer("a cat")
    assert ids.shape == (1, 48)
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    n = int(mask.sum())
    assert ids[0, 0] == raw.token_to_id("<|im_start|>")
    newline = raw.token_to_id("Ċ")  # byte-level "\n"; the tiny vocabulary has no "\n\n" token
    tail = [raw.token_to_id("<think>"), newline, newline, raw.token_to_id("</think>"), newline, newline]
    assert list(ids[0, n - 6 : n]) == tail
    assert raw.token_to_id("<|im_end|>") in ids[0, :n]
    assert tokenizer.pad_id == raw.token_to_id("<|endoftext|>") and (ids[0, n:] == tokenizer.pad_id).all()
    assert tokenizer.render("x") == LITERAL.format("x")


def test_tiny_tokenizer_is_deterministic(folder, tmp_path):
    """Same bytes in this process and in another one with a different hash seed."""
    write_tiny_tokenizer(tmp_path / "again")
    code = f"from flowgen.engine.text.tiny_tokenizer import write_tiny_tokenizer; write_tiny_tokenizer({str(tmp_path / 'other')!r})"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        original = (folder / name).read_bytes()
        assert (tmp_path / "again" / name).read_bytes() == original
        assert (tmp_path / "other" / name).read_bytes() == original
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer" and config["pad_token"] == "<|endoftext|>"
    assert "enable_thinking" in config["chat_template"]


def test_tokenizer_errors_name_the_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable tokenizers file"):
        load_tokenizer(tmp_path)
    Tokenizer(models.BPE(vocab={"a": 0, "<|endoftext|>": 1}, merges=[])).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: token '<\|im_start\|>' is missing"):
        load_tokenizer(tmp_path)
