"""Reading checkpoints: safetensors files, sharded folders, and key mappings per model."""
