"""Reading checkpoints: safetensors files and sharded folders, and where a card's weights are on disk."""
