"""Configs of the checkpoint verbs (merge, add, remove, adopt, import_expert, extract)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flexmoe.config.base import Config, parse_size
from flexmoe.errors import ConfigError


SHARD_SIZE = "5GB"  # largest output shard by default, as `save_pretrained` writes


class _Sharded(Config):
    """A config with a `shard_size` ("5GB", "500MB"), checked when it is made."""

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_size(self.shard_size)


@dataclasses.dataclass
class MergeConfig(_Sharded):
    """`flexmoe merge`: an anchor and expert packages into one merged checkpoint.

    Args:
        anchor: the anchor folder every package was trained against.
        experts: expert packages, in router order after the public expert.
        top_k: experts active per token. None: min(4, E) (the paper's plateau); an explicit value is remembered
            and clamped to E as experts come and go.
        shard_size: largest output shard, e.g. "5GB", "500MB" (a larger tensor gets a shard of its own).
        verify_fingerprint: recompute the anchor fingerprint from its tensors instead of trusting the metadata.
    """

    anchor: Path
    experts: list[Path]
    top_k: int | None = None
    shard_size: str = SHARD_SIZE
    verify_fingerprint: bool = False


@dataclasses.dataclass
class AddConfig(_Sharded):
    """`flexmoe add`: append the package `expert` to the merged checkpoint `merged` (top_k None: kept)."""

    merged: Path
    expert: Path
    top_k: int | None = None
    shard_size: str = SHARD_SIZE
    verify_fingerprint: bool = False


@dataclasses.dataclass
class RemoveConfig(_Sharded):
    """`flexmoe remove`: drop the expert named `expert` (the owner's opt-out); top_k None: min(k, E-1)."""

    merged: Path
    expert: str
    top_k: int | None = None
    shard_size: str = SHARD_SIZE


@dataclasses.dataclass
class AdoptConfig(_Sharded):
    """`flexmoe adopt`: an existing E-expert `FlexOlmoForCausalLM` folder (no router bias) as a merged checkpoint.

    Args:
        model: the Hugging Face folder (sharded or not, any float dtype).
        names: one name per expert in router order; the first is "public" (expert 0, the public FFN).
        shard_size: largest output shard.
    """

    model: Path
    names: list[str]
    shard_size: str = SHARD_SIZE

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.names, str):
            self.names = [n.strip() for n in self.names.split(",")]
        if not self.names or self.names[0] != "public":
            raise ConfigError(f"--names must start with 'public' (expert 0 is the public FFN), got "
                              f"{','.join(self.names) or 'nothing'}; e.g. --names public,math,code")
        dup = sorted({n for n in self.names if self.names.count(n) > 1})
        if dup:
            raise ConfigError(f"--names lists {dup[0]!r} twice; every expert needs its own name")


@dataclasses.dataclass
class ImportExpertConfig(Config):
    """`flexmoe import-expert`: a 2-expert `FlexOlmoForCausalLM` folder (public + one domain) as an expert package.

    Args:
        model: the Hugging Face folder; its shared tensors, experts.0 and router row 0 must equal `anchor`'s.
        anchor: the flexmoe anchor (e.g. from `init-anchor --from-moe` of the public 2-expert model).
        name: the expert's name.
    """

    model: Path
    anchor: Path
    name: str


@dataclasses.dataclass
class ExtractConfig(Config):
    """`flexmoe extract`: write the expert named `expert` back out as an expert package."""

    merged: Path
    expert: str
