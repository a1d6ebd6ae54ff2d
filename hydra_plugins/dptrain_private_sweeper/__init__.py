"""dptrain's private hyperparameter search as a Hydra sweeper plugin (Hydra finds sweepers only in the hydra_plugins
namespace; the search itself is dptrain/search.py and dptrain/tuning.py)."""
