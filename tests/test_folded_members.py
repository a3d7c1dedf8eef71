"""Members folded into the batch: each member's output, gradients and BatchNorm statistics equal the
member run alone; MemberForward folds only where one folded forward matched vmap."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_relief.models import MLP, LeNet5
from lightning_relief.models.mnist1d import MNIST1DCNN
from lightning_relief.uncertainty.folded import foldable, folded_forward
from lightning_relief.uncertainty.stacking import member_forward, reinitialize, stack_states

M = 3
MODELS = {
    "mlp": (lambda: MLP(in_features=64, hidden=(32, 16), dropout=0.0), (6, 1, 8, 8)),
    "lenet_bn": (lambda: LeNet5(input_size=8, dropout=0.0, batch_norm=True), (6, 1, 8, 8)),
    "mnist1d_cnn": (lambda: MNIST1DCNN(dropout=0.0), (6, 1, 40)),
}


def _members(make) -> tuple[nn.Module, list[nn.Module]]:
    torch.manual_seed(0)
    template = make()
    members = []
    for m in range(M):
        member = copy.deepcopy(template)
        reinitialize(member, 10 + m)
        members.append(member)
    stacked = copy.deepcopy(template)
    stack_states(stacked, [dict([*m.named_parameters(), *m.named_buffers()]) for m in members])
    return stacked, members


@pytest.mark.parametrize("grouped_conv", [False, True], ids=["conv_per_member", "grouped_conv"])
@pytest.mark.parametrize("name", list(MODELS))
def test_folded_training_step_equals_each_member_alone(name, grouped_conv):
    make, shape = MODELS[name]
    stacked, members = _members(make)
    assert foldable(stacked)
    x = torch.randn(M * shape[0], *shape[1:], generator=torch.Generator().manual_seed(1))
    out = folded_forward(stacked.train(), x, M, grouped_conv=grouped_conv)
    out.square().sum().backward()
    stacked_tensors = dict([*stacked.named_parameters(), *stacked.named_buffers()])
    for m, (member, rows) in enumerate(zip(members, x.chunk(M))):
        alone = member.train()(rows)
        alone.square().sum().backward()
        torch.testing.assert_close(out.chunk(M)[m], alone, rtol=1e-5, atol=1e-5)
        for key, param in member.named_parameters():
            torch.testing.assert_close(stacked_tensors[key].grad[m], param.grad, rtol=1e-4, atol=1e-5, msg=key)
        for key, buffer in member.named_buffers():  # BatchNorm running statistics and batch counts
            torch.testing.assert_close(stacked_tensors[key][m], buffer, rtol=1e-5, atol=1e-6, msg=key)
    stacked.eval()
    eval_out = folded_forward(stacked, x, M, grouped_conv=grouped_conv)
    for m, (member, rows) in enumerate(zip(members, x.chunk(M))):
        torch.testing.assert_close(eval_out.chunk(M)[m], member.eval()(rows), rtol=1e-5, atol=1e-5)


def test_dropout_draws_its_own_mask_per_member():
    stacked, _ = _members(lambda: MLP(in_features=8, hidden=(64,), dropout=0.5))
    with torch.no_grad():
        for tensor in stacked.parameters():  # identical members on identical rows
            tensor.copy_(tensor[:1].expand_as(tensor))
    x = torch.randn(4, 8).repeat(M, 1)
    out = folded_forward(stacked.train(), x, M).chunk(M)
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[1], out[2])


class _Centered(nn.Module):
    """Subtracts the batch mean: mixes the examples of a batch, so members must not share one."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return self.linear(x - x.mean(0, keepdim=True))


@pytest.mark.parametrize(
    ("make", "folds"),
    [
        (lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), True),
        (_Centered, False),  # foldable layers, but one folded forward differs from vmap
        (lambda: nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3)), False),  # not foldable
    ],
    ids=["sequential", "batch_mixing", "layer_norm"],
)
def test_member_forward_folds_only_where_folding_matches_vmap(make, folds):
    stacked, members = _members(make)
    runner = member_forward(stacked)
    x = torch.randn(M * 5, 4)
    with runner.using("members"):
        out = stacked(x)
    assert list(runner.folding.values()) == [folds]
    for m, (member, rows) in enumerate(zip(members, x.chunk(M))):
        torch.testing.assert_close(out.chunk(M)[m], member(rows), rtol=1e-5, atol=1e-5)
    mixture = stacked(x[:5])  # the mixture mode runs every member on the same rows
    reference = torch.stack([member(x[:5]).log_softmax(-1) for member in members]).exp().mean(0).log()
    torch.testing.assert_close(mixture, reference, rtol=1e-5, atol=1e-5)
