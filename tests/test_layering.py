"""One-way imports: checkpoint surgery runs without transformers, accelerate, sentence-transformers or training code."""

from __future__ import annotations

import json
import subprocess
import sys

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
