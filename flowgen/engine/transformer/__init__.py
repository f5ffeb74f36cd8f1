"""The FLUX.2 [klein] transformer: config, layers, the NNX model, its jit-compiled wrapper, checkpoint loading."""
