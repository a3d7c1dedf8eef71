"""``deploy.export_model``: the model compiles with TVM and its outputs match PyTorch's (≤ 1e-4, same top-1)."""

from __future__ import annotations

import torch

from lightning_relief.deploy import load_compiled
from lightning_relief.deploy.export import export_model
from matrix import WORKS
from matrix.common import batch

PLUGIN = "export (`export_model`, TVM llvm)"

EXPECTED = {
    "resnet18": WORKS,
    "mobilenet_v3_small": WORKS,
    "conv1d_cnn": WORKS,
    "transformer": WORKS,
    "gru": WORKS,
    "upsample": WORKS,
    "functional": WORKS,
}
SLOW = {"resnet18", "mobilenet_v3_small"}


def check(zoo_model, tmp_path) -> None:
    model = zoo_model.make().eval()
    x, _ = batch(zoo_model, 4)
    export_model(model, x, tmp_path / "artifact", verify_batch=x, measure=False)
    compiled = load_compiled(tmp_path / "artifact")
    with torch.no_grad():
        expected = model(x)
    got = compiled(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
