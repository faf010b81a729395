"""smdm: masked diffusion language models next to matched autoregressive models."""

__version__ = "0.1.0"
