"""The FLUX.2 autoencoder: config, layers, the model (encode/decode), checkpoint reading and keys."""
