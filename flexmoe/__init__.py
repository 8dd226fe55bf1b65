"""flexmoe: FlexOlmo-style modular mixture-of-experts language models.

The verbs of `flexmoe.api` and the errors of `flexmoe.errors` are importable from here: `flexmoe.merge(...)`,
`flexmoe.load_model(...)`. They resolve on first use, so `import flexmoe` stays light (no torch until needed).
"""

__version__ = "0.1.0"

_VERBS = ("train_anchor", "init_anchor", "embed_domain", "train_expert", "merge", "add", "remove", "extract",
          "adopt", "import_expert", "inspect", "verify", "load_model", "select_proxy", "tune_router", "evaluate", "generate")
_ERRORS = ("FlexmoeError", "ConfigError", "DataError", "CheckpointError", "FingerprintMismatch", "IntegrityError",
           "OutputExistsError")
__all__ = ["__version__", *_VERBS, *_ERRORS]


def __getattr__(name: str):
    if name in _VERBS:
        from flexmoe import api

        return getattr(api, name)
    if name in _ERRORS:
        from flexmoe import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'flexmoe' has no attribute {name!r}")


def _source_checkout_cli() -> None:
    # The CLI lives in the top-level `cli/` folder and is installed as `flexmoe.cli` (setuptools package-dir).
    # Run straight from a source checkout (PYTHONPATH=. on the GPU machines, where nothing is installed) that
    # mapping is absent, so `flexmoe.cli` resolves to `<checkout>/cli` here too (docs/ARCHITECTURE.md says why).
    from pathlib import Path

    here = Path(__file__).resolve().parent
    if not (here / "cli").exists() and (here.parent / "cli" / "__init__.py").is_file():
        __path__.append(str(here.parent))


_source_checkout_cli()
