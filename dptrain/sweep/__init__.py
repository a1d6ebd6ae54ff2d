"""Sweeps over private data: the private hyperparameter search and its Hydra sweeper."""
