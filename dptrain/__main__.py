"""`python -m dptrain <overrides>`, and `torchrun --nproc_per_node=N -m dptrain <overrides>` (distributed.py)."""

from dptrain.cli.train import main

main()
