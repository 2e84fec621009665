"""headwise: an LLM inference server whose attention is observable."""

__version__ = "0.1.0"
