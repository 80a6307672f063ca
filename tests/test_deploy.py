from __future__ import annotations

import onnx
import torch

from lightning_compress.deploy import OnnxRuntimeModel, onnx_bytes
from lightning_compress.models import SmallCNN


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
