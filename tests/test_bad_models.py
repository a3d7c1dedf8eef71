"""Bad models, across plugins: nothing the plugin can act on, a forward that cannot be traced, an
input shape that does not fit. Each gives one typed error naming the model and the reason, and
writes nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_relief import ClassifierModule, MomentPropagationWrapper, convert_to_photonic
from lightning_relief.bayes import to_bayesian
from lightning_relief.deploy import DeployError
from lightning_relief.deploy.export import export_model
from lightning_relief.errors import UnsupportedModelError
from lightning_relief.models import LeNet5
from lightning_relief.moments import UnsupportedOperationError


class NothingToConvert(nn.Module):
    """Only functional calls: no layer any plugin could replace."""

    def forward(self, x):
        return F.log_softmax(x.flatten(1)[:, :10], -1)


class DataDependentBranch(nn.Module):
    """Python control flow on a tensor value: neither torch.fx nor torch.export can trace it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        x = self.drop(x.flatten(1))
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


@pytest.mark.parametrize(
    ("plugin", "convert"),
    [("to_bayesian", to_bayesian), ("convert_to_photonic", lambda m: convert_to_photonic(ClassifierModule(m)))],
)
def test_a_model_with_nothing_to_convert_is_refused_by_name(plugin, convert):
    with pytest.raises(UnsupportedModelError, match=rf"{plugin} cannot handle model \w+: it has no"):
        convert(NothingToConvert())


def test_moment_propagation_names_an_untraceable_model():
    with pytest.raises(UnsupportedOperationError, match="cannot trace DataDependentBranch.*control flow"):
        MomentPropagationWrapper(DataDependentBranch())(torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize(
    ("model", "shape", "reason"),
    [
        (DataDependentBranch(), (1, 1, 8, 8), "torch.export failed for DataDependentBranch: .*data-dependent"),
        (LeNet5(input_size=8), (1, 1, 5, 7), "torch.export failed for LeNet5: .*reduction dim"),
    ],
    ids=["untraceable", "wrong-input-shape"],
)
def test_export_names_the_model_and_the_reason_and_writes_nothing(model, shape, reason, tmp_path):
    with pytest.raises(DeployError, match=reason):
        export_model(model.eval(), torch.randn(*shape), tmp_path / "out", measure=False)
    assert list(tmp_path.iterdir()) == []
