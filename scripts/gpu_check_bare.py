"""Run dptrain.bench.gpu_check as on a bare GPU machine (torch, timm, numpy only): hydra, omegaconf, opacus, wandb,
kymatio, pytest, antlr4 and submitit unimportable. A CPU dry run of the flow (results/gpu-check-cpu-dryrun.md):

    PYTHONPATH=. python scripts/gpu_check_bare.py --device cpu --bench-models resnet18 --out /tmp/gpu-check
"""

import importlib.abc
import runpy
import sys

BLOCK = {"hydra", "omegaconf", "opacus", "wandb", "kymatio", "pytest", "antlr4", "submitit"}


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCK:
            raise ModuleNotFoundError(f"No module named '{name}' (blocked: bare-machine dry run)")


if __name__ == "__main__":
    sys.meta_path.insert(0, Block())
    sys.argv = ["gpu_check", *sys.argv[1:]]
    runpy.run_module("dptrain.bench.gpu_check", run_name="__main__")
