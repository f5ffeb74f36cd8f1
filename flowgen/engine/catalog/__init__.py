"""What models there are and what the engine supports, without JAX: model cards, capabilities, the tiny model."""
