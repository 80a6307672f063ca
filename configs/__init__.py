"""Hydra configs of lightning-compress, shipped inside the package as ``lightning_compress.configs``."""
