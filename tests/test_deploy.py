from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import onnx
import pytest
import torch

from lightning_compress.deploy import OnnxRuntimeModel, export, onnx_bytes
from lightning_compress.deploy.onnx import STOP_SPINNING
from lightning_compress.models import SmallCNN
from lightning_compress.quantization import QuantConfig, calibrate, quantize_model


def trained_like_cnn() -> SmallCNN:
    """A SmallCNN whose BatchNorm statistics are not the identity, so eval-mode export is visible."""
    torch.manual_seed(0)
    model = SmallCNN(num_classes=5, image_size=8)
    for _ in range(3):
        model(torch.randn(16, 1, 8, 8) * 3 + 1)
    return model


def test_onnx_runtime_computes_the_eval_mode_outputs_at_every_batch_size() -> None:
    model = trained_like_cnn().train()
    runtime = OnnxRuntimeModel.from_module(model, torch.zeros(1, 1, 8, 8), num_threads=1)
    assert model.training  # export leaves the module's modes as they were
    model.eval()
    for batch in (1, 7):
        inputs = torch.randn(batch, 1, 8, 8)
        torch.testing.assert_close(runtime(inputs), model(inputs).detach(), atol=1e-5, rtol=1e-5)


def test_exported_graph_has_a_dynamic_batch_and_no_training_ops() -> None:
    graph = onnx.load_from_string(onnx_bytes(trained_like_cnn(), torch.zeros(1, 1, 8, 8)))
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")
    assert "Dropout" not in {node.op_type for node in graph.graph.node}


@pytest.mark.parametrize("quantized", [False, True])
def test_exported_graph_carries_no_stack_traces_or_paths_of_this_machine(quantized: bool) -> None:
    model = trained_like_cnn().eval()
    if quantized:
        quantize_model(model, QuantConfig())
        calibrate(model, [torch.randn(8, 1, 8, 8)])
    data = onnx_bytes(model, torch.zeros(1, 1, 8, 8))
    graph = onnx.load_from_string(data)
    assert not any(node.metadata_props for node in graph.graph.node) and not graph.graph.metadata_props
    assert str(Path(__file__).parent.parent).encode() not in data and b"site-packages" not in data
    assert any(node.op_type == "QuantizeLinear" for node in graph.graph.node) == quantized


class _TakesADict(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(batch["x"])


class _Tiny(L.LightningModule):
    """A LightningModule with an ``example_input_array``."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.linear = torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)
        self.example_input_array = torch.zeros(2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == 5:
            raise RuntimeError("five features are not four\nsecond line of the error")
        return self.linear(self.norm(x))


def test_export_of_an_input_that_is_not_tensors_the_model_takes_fails_in_one_line(tmp_path) -> None:
    message = (
        "export takes example_input as one tensor, a tuple of tensors (the model's positional inputs) or a dict of "
        "tensors (its keyword inputs, such as input_ids and attention_mask); got list of Tensor"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        OnnxRuntimeModel.from_module(torch.nn.Linear(4, 2), [torch.zeros(1, 4)])
    # a dict is the model's keyword inputs, which this forward, taking one dict, does not have
    with pytest.raises(
        ValueError,
        match=r"^example_input of shape x \(1, 4\) does not fit _TakesADict: TypeError: .*keyword argument 'x'$",
    ):
        export(_TakesADict(), tmp_path / "model.onnx", {"x": torch.zeros(1, 4)})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "features, reason",
    [
        (3, "RuntimeError: running_mean should contain 3 elements not 4"),
        (5, "RuntimeError: five features are not four"),  # the first line of the model's error alone
    ],
)
def test_export_of_an_input_the_model_cannot_take_names_both_shapes(tmp_path, features: int, reason: str) -> None:
    model = _Tiny().train()
    model.norm.eval()  # a frozen part
    state = {name: value.clone() for name, value in model.state_dict().items()}
    message = (
        f"example_input of shape (1, {features}) does not fit _Tiny: {reason}; its example_input_array has shape (2, 4)"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        export(model, tmp_path / "model.onnx", torch.zeros(1, features))
    assert model.training and model.linear.training and not model.norm.training  # every mode as it was
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    assert list(tmp_path.iterdir()) == []


def test_export_creates_the_missing_folders_of_its_path(tmp_path) -> None:
    model = torch.nn.Linear(4, 2)
    for path, format in ((tmp_path / "a" / "b" / "model.onnx", "onnx"), (tmp_path / "c" / "d" / "model.pt", "torch")):
        assert export(model, path, torch.zeros(1, 4), format=format) == path
        assert path.stat().st_size > 0


def test_onnx_runtime_sessions_stop_spinning_after_each_call() -> None:
    """Sessions side by side (as a latency comparison times them) leave each other's cores alone."""
    runtime = OnnxRuntimeModel.from_module(torch.nn.Linear(4, 2), torch.zeros(1, 4), num_threads=2)
    options = runtime.session.get_session_options()
    assert options.get_session_config_entry(STOP_SPINNING) == "1"
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)
