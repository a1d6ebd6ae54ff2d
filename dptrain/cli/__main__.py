"""`python -m dptrain.cli <overrides>`: the same as `dptrain`."""
from dptrain.cli.train import main

main()
