"""DeepEnsembleStrategy: members against plain training, modes against each other, checkpoints, export."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from conftest import quiet_trainer
from lightning_relief import ClassifierModule, DeepEnsembleStrategy
from lightning_relief.models import MLP, LeNet5
from lightning_relief.uncertainty import EnsembleModel
from lightning_relief.uncertainty import functional as U
from lightning_relief.uncertainty.sampling import MemberBatchSampler
from lightning_relief.uncertainty.stacking import ensemble_model, num_members, reinitialize


def _lenet_module(**kwargs) -> ClassifierModule:
    return ClassifierModule(LeNet5(input_size=8, dropout=0.0), optimizer="sgd", lr=0.05, scheduler="none", **kwargs)


def _fit(module, digits, strategy, **trainer_kwargs):
    options = dict(max_steps=3, limit_val_batches=0, strategy=strategy)
    options.update(trainer_kwargs)
    trainer = quiet_trainer(**options)
    trainer.fit(module, digits)
    return trainer


def _members(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_vectorized_equals_sequential_and_members_differ(digits, seed):
    results = {}
    for mode in ("vectorized", "sequential"):
        L.seed_everything(0, verbose=False)
        module = _lenet_module()
        _fit(module, digits, DeepEnsembleStrategy(num_members=3, mode=mode))
        assert type(module) is ClassifierModule and num_members(module) == 3
        results[mode] = _members(module)
    for name, vec in results["vectorized"].items():
        assert vec.shape[0] == 3, name
        torch.testing.assert_close(vec, results["sequential"][name], rtol=1e-5, atol=1e-6, msg=name)
    weight = results["vectorized"]["model.classifier.7.weight"]
    assert not torch.allclose(weight[0], weight[1])
    # BatchNorm running statistics were updated per member inside vmap
    running = results["vectorized"]["model.features.0.1.running_mean"]
    assert running.abs().sum() > 0 and not torch.allclose(running[0], running[1])
    assert results["vectorized"]["model.features.0.1.num_batches_tracked"].tolist() == [3, 3, 3]


def test_each_member_equals_the_plain_model_trained_alone(digits, seed):
    """Member g of the ensemble == the user's module trained alone with member g's init and data order."""
    ensemble = _lenet_module()
    _fit(ensemble, digits, DeepEnsembleStrategy(num_members=3, seed=7, mode="vectorized"))
    member = 2
    alone = _lenet_module()
    reinitialize(alone, 7 + member)
    loader = DataLoader(
        digits.dataset("train"), batch_sampler=MemberBatchSampler(len(digits.dataset("train")), 64, [member], seed=7)
    )
    quiet_trainer(max_steps=3, limit_val_batches=0).fit(alone, train_dataloaders=loader)
    for name, tensor in alone.state_dict().items():
        torch.testing.assert_close(ensemble.state_dict()[name][member], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_evaluation_logs_mixture_metrics_and_predict_returns_mixture(digits, seed):
    module = ClassifierModule(MLP(in_features=64, hidden=(32,), dropout=0.2), lr=1e-2)
    strategy = DeepEnsembleStrategy(num_members=3, return_member_outputs=True)
    trainer = _fit(module, digits, strategy, max_steps=-1, max_epochs=1, limit_val_batches=1.0)
    metrics = trainer.test(module, digits, verbose=False)[0]

    exportable = ensemble_model(module, "model").eval()
    x, y = digits.dataset("test").tensors
    with torch.no_grad():
        member_probs = exportable.member_probs(x)
    probs = member_probs.mean(0)
    # the module's own metrics see the mixture; the strategy adds ensemble-only ones
    assert metrics["test_nll"] == pytest.approx(U.negative_log_likelihood(probs, y).item(), abs=1e-4)
    assert metrics["test_ensemble_nll"] == pytest.approx(metrics["test_nll"], abs=1e-5)
    assert metrics["test_acc"] == pytest.approx((probs.argmax(-1) == y).float().mean().item(), abs=1e-6)
    assert metrics["test_ece"] == pytest.approx(U.expected_calibration_error(probs.double(), y).item(), abs=1e-4)
    assert metrics["test_ensemble_mutual_info"] == pytest.approx(U.mutual_information(member_probs).mean().item(), abs=1e-4)
    assert metrics["test_ensemble_disagreement"] == pytest.approx(U.disagreement(member_probs).item(), abs=1e-5)
    member_nll = torch.stack([U.negative_log_likelihood(p, y) for p in member_probs]).mean()
    assert metrics["test_member_nll"] == pytest.approx(member_nll.item(), abs=1e-4)
    assert metrics["test_ensemble_nll"] < metrics["test_member_nll"]  # mixing never loses on NLL (Jensen)

    outputs = trainer.predict(module, digits.test_dataloader())
    predicted = torch.cat([o["prediction"] for o in outputs])
    members = torch.cat([o["member_probs"] for o in outputs], dim=1)
    torch.testing.assert_close(predicted, probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(members, member_probs, rtol=1e-5, atol=1e-6)


def test_checkpoint_reloads_every_member_with_identical_outputs(digits, seed, tmp_path):
    module = ClassifierModule(LeNet5(input_size=8), lr=1e-2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _fit(module, digits, DeepEnsembleStrategy(num_members=4), max_steps=4, enable_checkpointing=True, callbacks=[checkpoint])
    module.eval()
    x = digits.dataset("test").tensors[0][:50]
    with torch.no_grad():
        expected = module(x)
    loaded = ClassifierModule.load_from_checkpoint(checkpoint.last_model_path).eval()
    assert num_members(loaded) == 4
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected)
        exported_from = ensemble_model(loaded, "model").eval()
        torch.testing.assert_close(exported_from(x), expected.exp(), rtol=1e-5, atol=1e-6)
    # the ensemble compiles as one graph
    program = torch.export.export(exported_from, (x,))
    torch.testing.assert_close(program.module()(x), expected.exp(), rtol=1e-5, atol=1e-6)
    # training resumes from the checkpoint with all members and optimizer state
    resumed = ClassifierModule(LeNet5(input_size=8), lr=1e-2)
    trainer = quiet_trainer(max_steps=5, limit_val_batches=0, strategy=DeepEnsembleStrategy(num_members=4))
    trainer.fit(resumed, digits, ckpt_path=checkpoint.last_model_path)
    assert trainer.global_step == 5 and num_members(resumed) == 4


def test_bootstrap_and_data_order_per_member():
    sampler = MemberBatchSampler(100, 32, members=[0, 1], seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4 and len(batches[0]) == 64 and len(batches[-1]) == 8
    first = torch.tensor([i for b in batches for i in b[: len(b) // 2]])
    assert sorted(first.tolist()) == list(range(100))  # a permutation per member
    assert batches[0][:32] != batches[0][32:]
    again = list(MemberBatchSampler(100, 32, members=[1], seed=3))
    assert again[0] == batches[0][32:]  # member 1's stream does not depend on its neighbours
    sampler.set_epoch(1)
    assert list(sampler)[0] != batches[0]
    boot = MemberBatchSampler(100, 100, members=[0], seed=3, bootstrap=True)
    drawn = next(iter(boot))
    assert len(drawn) == 100 and len(set(drawn)) < 100  # with replacement


class _DirectModelModule(ClassifierModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)


def test_bad_configuration_is_refused_before_training(digits, seed):
    with pytest.raises(ValueError, match="num_members"):
        DeepEnsembleStrategy(num_members=0)
    with pytest.raises(ValueError, match="mode"):
        DeepEnsembleStrategy(mode="parallel")
    with pytest.raises(ValueError, match="start_method"):
        DeepEnsembleStrategy(mode="distributed", start_method="thread")
    module = _lenet_module()
    before = _members(module)
    with pytest.raises(ValueError, match="devices"):
        _fit(module, digits, DeepEnsembleStrategy(num_members=2), devices=2)
    # one process per node would each train every member, unaware of the others
    for mode in ("vectorized", "sequential"):
        with pytest.raises(ValueError, match="num_nodes=2"):
            _fit(module, digits, DeepEnsembleStrategy(num_members=2, mode=mode), num_nodes=2)
    assert DeepEnsembleStrategy(mode="distributed")._start_method == "popen"  # as Lightning's DDP
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # nothing lost
    with pytest.raises(RuntimeError, match=r"self\(x\)"):
        _fit(_DirectModelModule(LeNet5(input_size=8)), digits, DeepEnsembleStrategy(num_members=2))


def test_ensemble_model_from_members_matches_module_mixture(digits, seed):
    module = ClassifierModule(MLP(in_features=64, hidden=(16,)), lr=1e-2)
    _fit(module, digits, DeepEnsembleStrategy(num_members=2, mode="sequential"))
    module.eval()
    ensemble = ensemble_model(module, "model").eval()
    assert isinstance(ensemble, EnsembleModel) and ensemble.num_members == 2
    assert all(p.ndim in (1, 2) for p in ensemble.parameters())  # plain, unstacked members
    x = digits.dataset("val").tensors[0][:20]
    with torch.no_grad():
        torch.testing.assert_close(ensemble(x), module(x).exp(), rtol=1e-5, atol=1e-6)
        # a deep copy (what export and checkpoint callbacks make) runs its own weights, not the original's
        twin = copy.deepcopy(module)
        expected = module(x)
        next(module.parameters()).add_(1.0)
        torch.testing.assert_close(twin(x), expected)
        assert not torch.allclose(module(x), expected)


@pytest.mark.slow
def test_trained_ensemble_compiles_through_tvm_as_one_graph(digits, seed):
    """What TVMExportCallback does with the trained module: a frozen copy, compiled whole."""
    from lightning_relief.deploy import compile_for_target
    from lightning_relief.deploy.frontend import frozen_copy

    module = ClassifierModule(MLP(in_features=64, hidden=(16,)), lr=1e-2)
    _fit(module, digits, DeepEnsembleStrategy(num_members=3))
    copy = frozen_copy(module)
    x = digits.dataset("val").tensors[0][:8]
    with torch.no_grad():
        expected = module.eval()(x)
    compiled = compile_for_target(copy, (x,))
    torch.testing.assert_close(torch.as_tensor(compiled(x)), expected, rtol=1e-4, atol=1e-5)


def test_member_loader_fast_path_serves_the_same_batches():
    from torch.utils.data import TensorDataset, default_collate

    from lightning_relief.uncertainty.sampling import member_dataloader

    data = TensorDataset(torch.arange(100.0).unsqueeze(1), torch.arange(100))
    generic = member_dataloader(DataLoader(data, batch_size=16, collate_fn=lambda b: default_collate(b)), [0, 2], 3, True)
    fast = member_dataloader(DataLoader(data, batch_size=16), [0, 2], 3, True)
    assert type(fast.dataset).__name__ == "_TensorBatches" and len(fast) == len(generic) == 7
    for a, b in zip(generic, fast):
        assert type(a) is type(b) and all(torch.equal(u, v) for u, v in zip(a, b))


def test_member_initialisation_leaves_the_users_cuda_seed_alone():
    """Before CUDA starts, torch.manual_seed queues a seed for every GPU; the member init must not
    replace the one seed_everything queued (it would become seed + M - 1 once CUDA starts)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("checks the queue of seeds that only exists before CUDA starts")
    model = LeNet5(input_size=8)
    L.seed_everything(123, verbose=False)
    tracker = torch.cuda._lazy_seed_tracker  # private, but the only place the queued seed is visible
    queued = tracker.get_calls()[-1][0]
    cpu_state = torch.get_rng_state()
    reinitialize(model, 7)
    assert tracker.get_calls()[-1][0] is queued
    assert torch.equal(torch.get_rng_state(), cpu_state)  # the CPU generator was forked, not consumed


@pytest.mark.parametrize(
    ("optimizer_class", "options"),
    [
        (torch.optim.Adam, dict(lr=1e-2, weight_decay=5e-4)),
        (torch.optim.AdamW, dict(lr=1e-2)),
        (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)),
    ],
)
def test_fused_member_step_equals_torchs_fused_optimizer(optimizer_class, options):
    """The strategy's fused switch gives exactly what torch's own ``fused=True`` constructor gives,
    and the same update as the unfused optimizer up to rounding."""
    from lightning_relief.strategies.deep_ensemble import _fuse_step

    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(3, 7, 4, generator=generator), torch.randn(3, 7, generator=generator)]
    runs = {name: [torch.nn.Parameter(t.clone()) for t in start] for name in ("switched", "fused", "plain")}
    optimizers = {
        "switched": optimizer_class(runs["switched"], **options),
        "fused": optimizer_class(runs["fused"], fused=True, **options),
        "plain": optimizer_class(runs["plain"], **options),
    }
    _fuse_step(optimizers["switched"])
    for _ in range(4):
        grads = [torch.randn(t.shape, generator=generator) for t in start]
        for name, params in runs.items():
            for param, grad in zip(params, grads):
                param.grad = grad.clone()
            optimizers[name].step()
    for switched, fused, plain in zip(*runs.values()):
        assert torch.equal(switched, fused)
        torch.testing.assert_close(switched, plain, rtol=1e-6, atol=1e-6)


class _ExplicitForeach(ClassifierModule):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2, foreach=False)


def test_strategy_fuses_the_members_step_unless_the_user_chose(digits, seed):
    fused = ClassifierModule(MLP(in_features=64, hidden=(16,)), lr=1e-2, scheduler="none")
    trainer = _fit(fused, digits, DeepEnsembleStrategy(num_members=2), max_steps=2)
    assert trainer.optimizers[0].param_groups[0]["fused"] is True
    chosen = _ExplicitForeach(MLP(in_features=64, hidden=(16,)))
    trainer = _fit(chosen, digits, DeepEnsembleStrategy(num_members=2), max_steps=2)
    group = trainer.optimizers[0].param_groups[0]
    assert group["fused"] is None and group["foreach"] is False
