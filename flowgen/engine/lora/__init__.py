"""LoRA adapters: where a LoRA file lives, reading it into weight updates, merging them per batch."""
