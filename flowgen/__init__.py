"""flowgen: declarative batch image generation and editing with FLUX.2 [klein] in JAX."""

__version__ = "0.1.0"
