"""Shared fixtures of the anchor-family tests: one tiny anchor per family with three owner packages (random
biases) and two zero-bias ones, built once a session."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import pytest

from flexmoe.testing import build_random_anchor, build_random_package


class FamilyWorld(NamedTuple):
    anchor: Path
    pkgs: dict[str, Path]  # code, news, law: biases uniform in [-1, 0.5]
    zero: dict[str, Path]  # code, news with bias 0 (a merge of them routes like stock transformers)


@pytest.fixture(scope="session")
def family_world(tmp_path_factory) -> Callable[[str], FamilyWorld]:
    built: dict[str, FamilyWorld] = {}

    def get(family: str) -> FamilyWorld:
        if family not in built:
            root = tmp_path_factory.mktemp(family)
            anchor = build_random_anchor(root / "anchor", family=family)
            pkgs = {name: build_random_package(root / name, anchor, name, seed, ffn_std=0.1)
                    for name, seed in (("code", 1), ("news", 2), ("law", 3))}
            zero = {name: build_random_package(root / f"{name}0", anchor, name, seed, bias=0.0, ffn_std=0.1)
                    for name, seed in (("code", 1), ("news", 2))}
            built[family] = FamilyWorld(anchor, pkgs, zero)
        return built[family]

    return get
