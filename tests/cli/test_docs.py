from pathlib import Path

from flexmoe.cli.gendocs import render

DOCS = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def test_cli_reference_is_current():
    assert DOCS.read_text() == render(), "docs/cli.md is stale: run `make help-docs`"


def test_every_command_is_documented():
    text = render()
    for cmd in ("train-anchor", "init-anchor", "embed-domain", "train-expert", "merge", "add", "remove", "extract",
                "inspect", "eval", "generate"):
        assert f"## flexmoe {cmd}\n" in text
