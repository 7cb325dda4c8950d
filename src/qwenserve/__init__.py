"""qwenserve: self-hosted, Segmind-compatible serving for the Qwen-Image diffusion models."""

__version__ = "0.1.0"
