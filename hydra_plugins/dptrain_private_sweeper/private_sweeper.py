"""The Sweeper of conf/hydra/sweeper/dptrain_private.yaml: settings in, dptrain.sweep.search does the rest"""

from __future__ import annotations

from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper


class PrivateSearchSweeper(Sweeper):
    """Random search with a random, secret number of trials K (Papernot & Steinke 2022): distribution
    truncated_negative_binomial (shape η ≥ 0: 1 geometric, 0 logarithmic) or poisson, of mean E[K] = mean."""

    def __init__(self, distribution: str = "truncated_negative_binomial", mean: float = 5.0, shape: float = 1.0,
                 params: Any = None) -> None:
        self.distribution, self.mean, self.shape = distribution, mean, shape
        self.params = dict(params or {})
        self.config = self.launcher = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        from dptrain.sweep.search import search

        return search(self, arguments)
