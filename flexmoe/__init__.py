"""flexmoe: FlexOlmo-style modular mixture-of-experts language models."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `import flexmoe` stays light (no torch/transformers until a model is loaded).
    if name == "load_model":
        from flexmoe.api import load_model

        return load_model
    raise AttributeError(f"module 'flexmoe' has no attribute {name!r}")


def _source_checkout_cli() -> None:
    # The CLI lives in the top-level `cli/` folder and is installed as `flexmoe.cli` (setuptools package-dir).
    # Straight from a source checkout (PYTHONPATH=., or an editable install shadowed by the working directory)
    # that mapping is absent, so let `flexmoe.cli` resolve to `<checkout>/cli` there too.
    from pathlib import Path

    here = Path(__file__).resolve().parent
    if not (here / "cli").exists() and (here.parent / "cli" / "__init__.py").is_file():
        __path__.append(str(here.parent))


_source_checkout_cli()
