"""Keel: an OpenAI-compatible backend for AI chat products."""

__version__ = "0.1.0"
__all__ = ["__version__"]
