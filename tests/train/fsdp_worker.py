"""One process of a multi-process `flexmoe train-expert`, for tests/train/test_fsdp.py and test_fsdp_gpu.py.

    accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 2 \\
        tests/train/fsdp_worker.py STOP_AT train-expert --anchor ... --out OUT --checkpoint-every 2

Runs the real command line. With STOP_AT > 0 the run is first cut after STOP_AT optimizer steps in every process
(as a killed job would be, its resume checkpoint left in OUT.work), then continued with `--resume`.
"""

from __future__ import annotations

import os
import sys

from flexmoe import api
from flexmoe.cli import main


class Cut(Exception):
    pass


def _cut_after(steps: int):
    real = api.train_expert

    def train_expert(*args, **kwargs):
        def on_step(step: int) -> None:
            if step == steps:
                raise Cut

        return real(*args, **kwargs, on_step=on_step)

    return train_expert


if __name__ == "__main__":
    stop_at, args = int(sys.argv[1]), sys.argv[2:]
    if stop_at > 0:
        real, api.train_expert = api.train_expert, _cut_after(stop_at)
        try:
            main(args, standalone_mode=False)
            raise SystemExit(f"the run was not cut at step {stop_at}")
        except Cut:
            pass
        finally:
            api.train_expert = real
        args = [*args, "--resume"]
    real = api.train_expert

    def train_expert(*a, **k):
        result = real(*a, **k)
        if os.environ.get("RANK", "0") == "0":
            print(f"resumed from step {result.train.resumed_from}")
        return result

    api.train_expert = train_expert
    main(args, standalone_mode=False)
