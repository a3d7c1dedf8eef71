"""The TVM check the moment-propagation tests share: one compiled graph whose two outputs equal the wrapper's."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_relief.moments import MomentPropagationWrapper


def assert_compiles_to_matching_tvm(wrapper: MomentPropagationWrapper, *inputs: Tensor, rtol: float, atol: float) -> None:
    """Compiled at ``inputs[0]``; every input (untuned builds take any batch size) gives the wrapper's mean and
    variance (variance to ``atol / 10``: it is the smaller of the two)."""
    from lightning_relief.deploy import compile_for_target

    compiled = compile_for_target(wrapper, inputs[0])
    assert len(compiled.metadata["outputs"]) == 2
    for x in inputs:
        mean, var = compiled(x)
        expected_mean, expected_var = wrapper(x)
        torch.testing.assert_close(mean, expected_mean.detach(), rtol=rtol, atol=atol)
        torch.testing.assert_close(var, expected_var.detach(), rtol=rtol, atol=atol / 10)
