"""One-way imports: checkpoint surgery runs without transformers, accelerate, sentence-transformers or training code."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

FORBIDDEN = ("transformers", "accelerate", "sentence_transformers", "datasets", "flexmoe.train", "flexmoe.router.embed",
             "flexmoe.eval")

SCRIPT = """
import json, sys
from flexmoe.checkpoint import inspection, surgery
from flexmoe.config import MergeConfig, RemoveConfig
anchor, pkg, out = sys.argv[1:4]
surgery.merge(MergeConfig(anchor, [pkg]), out, progress=False)
inspection.inspect(out, verify=True)
surgery.remove(RemoveConfig(out, "code"), out + "-r", progress=False)
from flexmoe.cli import main  # the CLI path too: `flexmoe merge/remove/inspect` import all command modules
main(["merge", "--anchor", anchor, "--expert", pkg, "--out", out + "-cli", "-q"], standalone_mode=False)
main(["inspect", out + "-cli"], standalone_mode=False)
print(json.dumps(sorted(sys.modules)))
"""


def test_surgery_imports_no_model_or_training_stack(ckpt, tmp_path):
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(ckpt.anchor), str(ckpt.pkg["code"]), str(tmp_path / "m")],
                         capture_output=True, text=True, check=True)
    loaded = json.loads(res.stdout.strip().splitlines()[-1])
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert not bad, f"checkpoint surgery imported {bad[:5]}"
    assert "flexmoe.checkpoint.surgery" in loaded and "flexmoe.cli.ckpt" in loaded
    assert (tmp_path / "m-r" / "config.json").is_file() and (tmp_path / "m-cli" / "config.json").is_file()


# The import rules of docs/ARCHITECTURE.md, checked on the source (every import, also those inside functions).
ROOT = Path(__file__).resolve().parents[1]
RULES = {
    # the CLI is a thin layer over the public front: configs in, results out, library errors become one line
    "cli": ("flexmoe.api", "flexmoe.config", "flexmoe.presets", "flexmoe.errors", "flexmoe.cli", "flexmoe"),
    # checkpoint I/O is the floor: it knows files, tensors and names, nothing of models, training or stages
    "flexmoe/io": ("flexmoe.io", "flexmoe.errors"),
    # the stages' shared vocabulary imports no stage
    "flexmoe/config": ("flexmoe.config", "flexmoe.errors"),
    "flexmoe/errors.py": (),
}


def _flexmoe_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] if node.module != "flexmoe" else [f"flexmoe.{a.name}" for a in node.names]
    return [n for n in names if n == "flexmoe" or n.startswith("flexmoe.")]


@pytest.mark.parametrize("where", sorted(RULES))
def test_import_rules(where):
    allowed = RULES[where]
    files = [ROOT / where] if where.endswith(".py") else sorted((ROOT / where).rglob("*.py"))
    assert files
    bad = [f"{f.relative_to(ROOT)} imports {name}" for f in files for name in _flexmoe_imports(f)
           if not any(name == a or (name.startswith(a + ".") and a != "flexmoe") for a in allowed)
           and not (where == "cli" and name in ("flexmoe.__version__",))]
    assert not bad, bad


def test_every_library_package_is_installed():
    """pyproject lists its packages by name (flexmoe.cli lives in cli/): a new subpackage missing there would work
    in an editable checkout and be absent from a built wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "flexmoe").rglob("__init__.py")}
    assert found | {"flexmoe.cli"} == listed
