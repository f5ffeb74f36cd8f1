"""Prompt tokenisation for FLUX.2 [klein]'s Qwen3 text encoder, without transformers.

diffusers (`Flux2KleinPipeline._get_qwen3_prompt_embeds`) wraps each prompt in the Qwen3 chat
template (one user turn, generation prompt, thinking disabled), tokenises it with
`padding="max_length", truncation=True, max_length=512` and right-pads with `<|endoftext|>`.
For a single user message that template renders to a fixed string, so we format it by hand and
run the `tokenizers` library on `tokenizer.json`; the parity tests check both against
transformers' `apply_chat_template` + tokenizer call on the same folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from flowgen.errors import CheckpointError

PROMPT_TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_PAD_TOKEN = "<|endoftext|>"
_TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")


class KleinTokenizer:
    """Turns prompts into fixed-length (ids, mask) arrays the way the Klein pipeline does."""

    def __init__(self, tokenizer: Tokenizer, pad_id: int, max_length: int = 512):
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        # Padding and truncation are done here, so a tokenizer.json that configures its own
        # must not interfere.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tokenizer = tokenizer
        self.pad_id = int(pad_id)
        self.max_length = int(max_length)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added (special) tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def render(self, prompt: str) -> str:
        """The prompt wrapped in the Qwen3 chat template, exactly as the pipeline feeds it."""
        return PROMPT_TEMPLATE.format(prompt=prompt)

    def __call__(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenise prompts to `(ids, mask)`, both int32 `(B, max_length)`.

        Longer prompts are cut at `max_length` tokens (on the right, like transformers); shorter
        ones are right-padded with the pad token and mask 0.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(prompts), self.max_length), dtype=np.int32)
        encodings = self._tokenizer.encode_batch([self.render(p) for p in prompts], add_special_tokens=True)
        for row, encoding in enumerate(encodings):
            tokens = encoding.ids[: self.max_length]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return ids, mask


def load_tokenizer(folder: str | Path, max_length: int = 512) -> KleinTokenizer:
    """Load a Qwen tokenizer folder (`tokenizer.json`, optional `tokenizer_config.json`).

    The pad token is `pad_token` from tokenizer_config.json, else `<|endoftext|>`. Raises
    CheckpointError if the files are missing or unreadable or the chat-template tokens are absent.
    """
    folder = Path(folder)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise CheckpointError(f"{folder}: no tokenizer.json in the tokenizer folder")
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as err:  # the Rust loader raises plain Exception subclasses
        raise CheckpointError(f"{tokenizer_file}: not a readable tokenizers file ({_one_line(err)})") from None
    pad_token = _pad_token(folder / "tokenizer_config.json")
    for token in (*_TEMPLATE_TOKENS, pad_token):
        if tokenizer.token_to_id(token) is None:
            raise CheckpointError(f"{tokenizer_file}: token {token!r} is missing; a Qwen3 tokenizer is required")
    pad_id = tokenizer.token_to_id(pad_token)
    assert pad_id is not None  # checked with the template tokens above
    return KleinTokenizer(tokenizer, pad_id, max_length)


def _pad_token(config_file: Path) -> str:
    if not config_file.is_file():
        return DEFAULT_PAD_TOKEN
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{config_file}: cannot read ({_one_line(err)})") from None
    pad = config.get("pad_token") if isinstance(config, dict) else None
    if isinstance(pad, dict):  # serialized AddedToken
        pad = pad.get("content")
    return pad if isinstance(pad, str) else DEFAULT_PAD_TOKEN


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())
