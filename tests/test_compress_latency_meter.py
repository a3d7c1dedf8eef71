"""LatencyMeter measures whole models through the deploy backend seam (TVM or ONNX Runtime)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_relief.compress import analyze
from lightning_relief.compress.latency import LatencyMeter
from lightning_relief.deploy import CompiledModel
from lightning_relief.deploy.onnx_artifact import OnnxArtifact


def _mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)).eval()


@pytest.mark.slow  # four compiles (~30 s on the loaded 2-core VM)
@pytest.mark.parametrize("backend, artifact", [("tvm", CompiledModel), ("onnxruntime", OnnxArtifact)])
def test_latency_meter_compiles_and_times_with_its_backend(backend, artifact, tmp_path):
    torch.manual_seed(0)
    big, small = _mlp(1024), _mlp(16)  # about 1000 times apart in multiply-adds
    meter = LatencyMeter("llvm", cache_dir=tmp_path, repeat=3, number=5, compare_seconds=0.2, backend=backend)
    meter.cost_model(analyze(big, torch.zeros(1, 64)))
    reference = meter.set_reference(big)
    assert isinstance(meter.compiled_reference, artifact)
    assert meter.compiled_reference.metadata["dynamic_batch"] is False  # the one shape the search prices
    with torch.no_grad():
        torch.testing.assert_close(meter.compiled_reference(torch.ones(1, 64)), big(torch.ones(1, 64)), atol=1e-5, rtol=1e-5)
    assert 0 < meter.measure(small) < 0.5 * reference
    # only TVM's ratios are cached (keyed by its graph hash)
    assert any((tmp_path / "latency_ratio").glob("*")) == (backend == "tvm")


def test_latency_meter_names_an_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        LatencyMeter("llvm", backend="tensorrt")
