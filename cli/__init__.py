"""The `flexmoe` command line: a thin click layer over `flexmoe.api`.

Library errors (`FlexmoeError`) become one-line messages with exit code 1; process-wide settings
(logging, offline hub mode) are set here and nowhere in the library.
"""

from __future__ import annotations

import os

import click

from flexmoe import api
from flexmoe.errors import FlexmoeError


class FlexmoeGroup(click.Group):
    """Turns every `FlexmoeError` raised by a command into `click.ClickException` (one line, exit 1)."""

    def invoke(self, ctx: click.Context):
        try:
            result = super().invoke(ctx)
        except FlexmoeError as e:
            raise click.ClickException(str(e)) from e
        api.release_processes()  # a multi-process launch: every rank tears down its process groups, then exits
        return result


CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=FlexmoeGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="flexmoe")
def main() -> None:
    """flexmoe: FlexOlmo-style modular mixture-of-experts.

    Data owners train experts against a frozen public anchor; experts are merged into one
    transformers `FlexOlmoForCausalLM` checkpoint and can be added or removed later without retraining.

    \b
    Typical flow:
      flexmoe train-anchor --data public.jsonl --embedder EMB --out runs/anchor
      flexmoe train-expert --config experts/code.yaml --anchor runs/anchor --out runs/code
      flexmoe merge --anchor runs/anchor --expert runs/code --expert runs/speeches --out runs/merged
      flexmoe remove runs/merged --expert speeches --out runs/merged-no-speeches
    """
    # Nothing may be downloaded from a hub at run time: every model path is local.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _register() -> None:
    # Each module adds its commands to `main`; imported here so `flexmoe --help` lists them all.
    from flexmoe.cli import audit, ckpt, eval, generate, train, tune  # noqa: F401


_register()
