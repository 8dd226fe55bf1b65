"""flexmoe: FlexOlmo-style modular mixture-of-experts language models."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `import flexmoe` stays light (no torch/transformers until a model is loaded).
    if name == "load_model":
        from flexmoe.api import load_model

        return load_model
    raise AttributeError(f"module 'flexmoe' has no attribute {name!r}")
