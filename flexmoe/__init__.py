"""flexmoe: FlexOlmo-style modular mixture-of-experts language models."""

__version__ = "0.1.0"
