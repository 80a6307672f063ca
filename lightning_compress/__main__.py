"""``python -m lightning_compress``: the same Hydra application as the ``lightning-compress`` command."""

from lightning_compress.cli import main

main()
