"""Prompts -> embeddings: the Qwen3 text encoder, its tokenizers, the prompt cache and checkpoint keys."""
