"""The ``lightning-compress-sensitivity`` command: per-layer pruning sensitivity of a trained model, resumable.

It trains the configured model dense (or reuses ``dense.pt`` from an earlier, interrupted analysis in
the same run folder), prunes each Conv/Linear layer alone by magnitude to each level, measures
validation accuracy, and writes ``sensitivity.csv``, ``sensitivity.png`` and ``layer_amounts.yaml``
(the per-layer amounts for ``compression/pruning=sensitivity``).
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from lightning_compress.analysis.sensitivity import (
    layer_amounts,
    plot_sensitivity,
    sensitivity_analysis,
)
from lightning_compress.files import write_atomically
from lightning_compress.run import build
from lightning_compress.safe_loading import load_weights


def analyse(cfg: DictConfig) -> dict[str, float]:
    """Run the analysis ``cfg`` describes in ``cfg.output_dir``; return the per-layer amounts it suggests."""
    settings = cfg.sensitivity
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule: L.LightningDataModule = build(cfg.data)
    module: L.LightningModule = build(cfg.model)
    weights, settings_file = output_dir / "dense.pt", output_dir / "analysis.yaml"
    analysed = yaml.safe_dump(
        {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("data", "model", "trainer")}
        | {"seed": cfg.get("seed")}
    )
    if weights.is_file():  # a resumed analysis measures the same model on the same data
        if settings_file.is_file() and settings_file.read_text() != analysed:
            raise ValueError(
                f"{output_dir} holds an analysis of other data, model, trainer or seed settings (its analysis.yaml); "
                "resume it with the overrides it was started with, or start a new analysis in another folder"
            )
        module.load_state_dict(load_weights(weights, str(weights)))
    else:
        trainer: L.Trainer = build(cfg.trainer, logger=False)
        trainer.fit(module, datamodule=datamodule)
        write_atomically(weights, lambda path: torch.save(module.state_dict(), path))
        write_atomically(settings_file, lambda path: path.write_text(analysed))
    datamodule.setup("fit")
    batches = list(datamodule.val_dataloader())
    csv_path = output_dir / "sensitivity.csv"
    points = sensitivity_analysis(
        module.cpu(), batches, settings.levels, csv_path, settings.get("targets"), settings.get("exclude")
    )
    write_atomically(output_dir / "sensitivity.png", lambda path: plot_sensitivity(points, path))
    amounts = layer_amounts(csv_path, settings.max_accuracy_drop)
    write_atomically(
        output_dir / "layer_amounts.yaml", lambda path: path.write_text(yaml.safe_dump(amounts, sort_keys=False))
    )
    print(f"per-layer amounts within {100 * settings.max_accuracy_drop:.1f} points of accuracy each:")
    print(yaml.safe_dump(amounts, sort_keys=False) or "(none: every layer is too sensitive at the lowest level)")
    print(f"written: {csv_path}, {output_dir / 'sensitivity.png'}, {output_dir / 'layer_amounts.yaml'}")
    return amounts


@hydra.main(version_base="1.3", config_path="pkg://lightning_compress.configs", config_name="sensitivity")
def main(cfg: DictConfig) -> None:
    analyse(cfg)


if __name__ == "__main__":
    main()
