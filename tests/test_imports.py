"""Importing the package, and drawing its figures, leave the user's process as it was."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent(
    """
    import json, sys, tempfile
    from pathlib import Path
    import matplotlib
    matplotlib.use("svg")  # the user's choice, made before the package is imported
    import lightning_compress
    imported = {name: name in sys.modules for name in ("onnx", "onnxruntime")}
    import torch
    import matplotlib.pyplot as plt
    from lightning_compress.analysis import Report, profile_model
    from lightning_compress.sweeps.pareto import plot_pareto
    report = Report()
    report.add("before", profile_model(torch.nn.Linear(4, 2), (4,), latency_batch_sizes=()))
    folder = Path(tempfile.mkdtemp())
    report.write(folder)
    plot_pareto({"bytes": [], "latency": []}, folder / "pareto.png")
    print(json.dumps({"imported": imported, "backend": matplotlib.get_backend(), "open_figures": plt.get_fignums()}))
    """
)


def test_importing_and_plotting_leave_the_backend_and_skip_the_runtimes() -> None:
    completed = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    # onnx and onnxruntime load when a graph is made or run, so a missing one gets the pip hint of check_export_format
    assert result["imported"] == {"onnx": False, "onnxruntime": False}
    assert result["backend"] == "svg" and result["open_figures"] == []
