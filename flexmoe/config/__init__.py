"""Typed configs. YAML files and `key.sub=value` overrides map onto these dataclasses; unknown keys are errors.

Each verb's config lives here so the CLI, the recipes and the expert specs in `experts/` share one schema:
`base` (the machinery and the choices every verb shares), `train` (training, router tuning, proxy selection),
`checkpoint` (merge, add, remove, adopt, import, extract) and `eval` (evaluate, generate, the extraction audit).
Import from `flexmoe.config`; the submodules are its layout, not separate interfaces.
"""

from flexmoe.config.base import (Config, Device, DType, ExpertsKernel, from_dict, jsonable, load_yaml, parse_size,
                                 with_overrides)
from flexmoe.config.checkpoint import (SHARD_SIZE, AddConfig, AdoptConfig, ExtractConfig, ImportExpertConfig,
                                       MergeConfig, RemoveConfig)
from flexmoe.config.eval import EVAL_TASKS, EvalConfig, ExtractionConfig, GenerateConfig, parse_domain_paths
from flexmoe.config.train import (AnchorConfig, BiasUpdate, EmbedConfig, ExpertMode, ExpertSpec, InitAnchorConfig,
                                  ProxyConfig, PublicLoss, RouterInit, RouterSource, RouterTraining, RouterTuneConfig,
                                  TrainAnchorConfig, TrainConfig, router_tuning_train)

__all__ = [
    "Config", "Device", "DType", "ExpertsKernel", "from_dict", "jsonable", "load_yaml", "parse_size", "with_overrides",
    "SHARD_SIZE", "AddConfig", "AdoptConfig", "ExtractConfig", "ImportExpertConfig", "MergeConfig", "RemoveConfig",
    "EVAL_TASKS", "EvalConfig", "ExtractionConfig", "GenerateConfig", "parse_domain_paths",
    "AnchorConfig", "BiasUpdate", "EmbedConfig", "ExpertMode", "ExpertSpec", "InitAnchorConfig", "ProxyConfig",
    "PublicLoss", "RouterInit", "RouterSource", "RouterTraining", "RouterTuneConfig", "TrainAnchorConfig",
    "TrainConfig", "router_tuning_train",
]
