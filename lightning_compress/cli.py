"""The ``lightning-compress`` command: a Hydra application over ``configs/train.yaml``.

Run it with no arguments to train the default model on the bundled digits dense, pruned, quantized, and
pruned and quantized, with the same epochs and seed, and print the four side by side; override anything
Hydra-style, e.g. ``lightning-compress data=fashion_mnist compression/pruning=taylor_channel50 trainer.max_epochs=8``.
The job itself is :func:`lightning_compress.job.train`; this module parses and dispatches.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from lightning_compress.distributed import exit_with_launcher
from lightning_compress.job import train
from lightning_compress.run_folder import RunFolderError
from lightning_compress.sweeps.job import finished_report, one_job_of_a_sweep, record_failure, record_finished
from lightning_compress.sweeps.objectives import objectives


@hydra.main(version_base="1.3", config_path="pkg://lightning_compress.configs", config_name="train")
def main(cfg: DictConfig) -> float | list[float] | None:
    exit_with_launcher()  # a further DDP rank goes when the rank that launched it goes
    for exporter in ("onnx_ir", "onnxscript"):  # the ONNX exporter reports each pass at INFO
        logging.getLogger(exporter).setLevel(logging.WARNING)
    with one_job_of_a_sweep() as overrides:
        if overrides is not None:  # the same sweep run again keeps the jobs it finished
            finished = finished_report(cfg.output_dir, overrides)
            if finished is not None:
                logging.getLogger(__name__).info("%s: finished earlier with these overrides, kept", cfg.output_dir)
                return objectives(cfg, finished)
        try:
            result = objectives(cfg, train(cfg, continue_interrupted=overrides is not None))
            if overrides is not None:
                record_finished(cfg.output_dir, overrides)
            return result
        except RunFolderError:
            raise  # the folder is another run's: write nothing into it
        except Exception as error:
            record_failure(cfg.output_dir, error)
            raise


if __name__ == "__main__":
    main()
