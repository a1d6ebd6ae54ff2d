"""The training story: run, loop, budget, ledger, checkpoint and resume, data parallelism, outputs."""
