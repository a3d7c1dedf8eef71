"""lightning_relief.deploy: compile, artifacts, latency cache, layer table, errors.

Every compiled output is compared with PyTorch eager on the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lightning_relief.deploy import (
    CompiledModel,
    LayerLatencyTable,
    UnsupportedOperatorError,
    compare_latency,
    compile_for_target,
    load_compiled,
    measure_latency,
)
from lightning_relief.deploy.targets import resolve_target, target_dict
from lightning_relief.models import MLP, LeNet5, resnet8

ROOT = Path(__file__).resolve().parents[1]


def eager(model: nn.Module, *xs: torch.Tensor):
    model.eval()
    with torch.no_grad():
        return model(*xs)


@pytest.fixture(scope="module")
def lenet_compiled(tmp_path_factory):
    torch.manual_seed(0)
    model = LeNet5(input_size=8).eval()
    source = tmp_path_factory.mktemp("ckpt") / "source.ckpt"
    source.write_bytes(b"stand-in checkpoint bytes")
    return model, compile_for_target(model, torch.zeros(1, 1, 8, 8), source_checkpoint=source)


def test_lenet_parity_at_any_batch_size(lenet_compiled, digits):
    model, compiled = lenet_compiled
    x = next(iter(digits.val_dataloader()))[0]
    for batch in (x[:1], x[:5], x):
        out = compiled(batch)
        assert isinstance(out, torch.Tensor) and out.shape == (batch.shape[0], 10)
        torch.testing.assert_close(out, eager(model, batch), atol=1e-5, rtol=1e-5)
    assert compiled.metadata["dynamic_batch"] is True
    assert compiled.metadata["inputs"][0]["shape"] == [None, 1, 8, 8]


@pytest.mark.parametrize("make", [lambda: MLP(dropout=0.5), lambda: resnet8(width=4)], ids=["mlp", "resnet8"])
def test_reference_models_match_pytorch(make, digits):
    torch.manual_seed(0)
    model = make().eval()
    x = next(iter(digits.val_dataloader()))[0][:16]
    compiled = compile_for_target(model, x)
    out = compiled(x.numpy())  # numpy in, numpy out
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, eager(model, x).numpy(), atol=1e-5, rtol=1e-5)


class ResidualConvBN(nn.Module):
    """conv -> BN (foldable), and conv -> BN whose conv output also feeds the residual (not foldable)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        z = self.conv2(y)
        return self.head(torch.relu(self.bn2(z) + z).mean((2, 3)))


def _batch_norm_ops(mod) -> int:
    return mod.script(show_meta=False).count("R.nn.batch_norm(")


def test_batch_norm_is_folded_into_the_convolution_before_it(digits):
    from lightning_relief.deploy import to_relax

    torch.manual_seed(0)
    net, resnet = ResidualConvBN().eval(), resnet8(width=4).eval()
    for bn in (m for model in (net, resnet) for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    x = next(iter(digits.val_dataloader()))[0][:8]
    assert _batch_norm_ops(to_relax(net, x, batch_norm_folding=False).mod) == 2
    assert _batch_norm_ops(to_relax(net, x).mod) == 1  # bn2's conv output is used twice
    assert _batch_norm_ops(to_relax(resnet, x).mod) == 0
    for model in (net, resnet):
        compiled = compile_for_target(model, x)
        for batch in (x[:1], x):
            torch.testing.assert_close(compiled(batch), eager(model, batch), atol=1e-4, rtol=0)
    assert isinstance(net.bn1, nn.BatchNorm2d) and net.conv1.bias is None, "the source model is not touched"


def test_pruned_model_compiles_with_fewer_channels(digits):
    import torch_pruning as tp

    torch.manual_seed(0)
    model = LeNet5(input_size=8).eval()
    x = next(iter(digits.val_dataloader()))[0][:8]
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    graph.get_pruning_group(model.features[0][0], tp.prune_conv_out_channels, idxs=[0, 2, 4]).prune()
    assert model.features[0][0].out_channels == 3
    compiled = compile_for_target(model, x)
    assert compiled.params[0].shape[0] == 3  # the first conv's weight really is smaller
    torch.testing.assert_close(compiled(x), eager(model, x), atol=1e-5, rtol=1e-5)


class MeanVariance(nn.Module):
    """Two outputs, as moment propagation returns them."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        mean = self.net(x.flatten(1))
        return mean, nn.functional.softplus(mean) + 1e-3


class SoftmaxEnsemble(nn.Module):
    """Three members averaged in probability space: one graph."""

    def __init__(self) -> None:
        super().__init__()
        self.members = nn.ModuleList(MLP(hidden=(16,)) for _ in range(3))

    def forward(self, x):
        return torch.stack([m(x).softmax(-1) for m in self.members]).mean(0)


def test_tuple_outputs_and_ensemble_in_one_graph(digits):
    torch.manual_seed(0)
    x = next(iter(digits.val_dataloader()))[0][:8]
    moments = MeanVariance().eval()
    compiled = compile_for_target(moments, x[:1])
    mean, var = compiled(x)
    ref_mean, ref_var = eager(moments, x)
    torch.testing.assert_close(mean, ref_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var, ref_var, atol=1e-5, rtol=1e-5)
    assert [o["shape"] for o in compiled.metadata["outputs"]] == [[None, 10], [None, 10]]

    ensemble = SoftmaxEnsemble().eval()
    probs = compile_for_target(ensemble, x)(x)
    torch.testing.assert_close(probs, eager(ensemble, x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(8), atol=1e-5, rtol=0)


_LOAD_SCRIPT = """
import sys
sys.modules["torch"] = None  # PyTorch made unimportable: the artifact must run without it
import numpy as np
from lightning_relief.deploy import load_compiled
compiled = load_compiled(sys.argv[1])
np.save(sys.argv[3], compiled(np.load(sys.argv[2])))
assert not [m for m in sys.modules if m.startswith(("lightning_relief.models", "lightning."))]
"""


def test_artifact_round_trip_in_a_fresh_process(lenet_compiled, tmp_path, digits):
    model, compiled = lenet_compiled
    artifact = compiled.save(tmp_path / "artifact")
    meta = json.loads((artifact / "metadata.json").read_text())
    source = Path(meta["source_checkpoint"])
    assert meta["source_checkpoint_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert meta["versions"]["lightning_relief"] and meta["versions"]["tvm"]
    assert meta["outputs"][0]["dtype"] == "float32" and meta["target"]["kind"] == "llvm"
    x = next(iter(digits.test_dataloader()))[0][:7].numpy()
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, str(artifact), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        check=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), eager(model, torch.from_numpy(x)).numpy(), atol=1e-5, rtol=1e-5)
    # saving again replaces the artifact as a whole
    compiled.save(artifact)
    assert sorted(p.name for p in artifact.iterdir()) == ["metadata.json", "model.so", "params.npz"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".artifact")]


def test_wrong_inputs_are_named(lenet_compiled):
    _, compiled = lenet_compiled
    with pytest.raises(ValueError, match=r"input 'x': expected shape \['batch', 1, 8, 8\]"):
        compiled(np.zeros((2, 1, 16, 16), np.float32))
    with pytest.raises(ValueError, match="expected 1 input"):
        compiled(np.zeros((2, 1, 8, 8), np.float32), np.zeros(1, np.float32))
    with pytest.raises(FileNotFoundError, match="missing"):
        load_compiled(ROOT / "docs")


class Bessel(nn.Module):
    def forward(self, x):
        return torch.special.bessel_j0(x)


def test_unsupported_operator_names_operator_and_module_and_leaves_model_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), Bessel()))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedOperatorError, match=r"'special_bessel_j0.default' used in module '1.1' \(Bessel\)") as info:
        compile_for_target(model, torch.randn(2, 4))
    assert info.value.operator == "special_bessel_j0.default" and info.value.module_path == "1.1"
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_latency_is_cached_by_graph_shape_and_target(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(1, 16)
    first = measure_latency(model, x, repeat=5, number=3, cache_dir=tmp_path)
    assert not first.cached and first.repeat == 5 and first.number == 3 and len(first.samples_ms) == 5
    samples = np.array(first.samples_ms)
    assert first.median_ms == pytest.approx(np.median(samples))
    q1, q3 = np.percentile(samples, [25, 75])
    assert first.iqr_ms == pytest.approx(q3 - q1) and first.std_ms == pytest.approx(samples.std())
    again = measure_latency(model, x, repeat=5, number=3, cache_dir=tmp_path)
    assert again.cached and again.median_ms == first.median_ms
    retrained = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))  # new weights, same graph
    assert measure_latency(retrained, x, repeat=5, number=3, cache_dir=tmp_path).cached
    other_target = {**target_dict(resolve_target("llvm")), "num-cores": 1}
    assert not measure_latency(model, x, other_target, repeat=2, number=2, cache_dir=tmp_path).cached
    with pytest.raises(ValueError, match="repeat must be"):
        measure_latency(model, x, repeat=0)


def test_latency_ratio_is_taken_side_by_side_and_cached(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 64)
    small, large = nn.Linear(64, 64), nn.Sequential(nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 64))
    reference = compile_for_target(small, x, dynamic_batch=False)
    first = compare_latency(large, reference, x, rounds=4, number=5, cache_dir=tmp_path, min_round_ms=1)
    assert not first.cached and len(first.candidate_rounds_ms) == len(first.reference_rounds_ms) == 4
    # the ratio is that of the fastest rounds, computed directly from the recorded rounds
    assert first.ratio == pytest.approx(min(first.candidate_rounds_ms) / min(first.reference_rounds_ms))
    assert first.ratios == pytest.approx([c / r for c, r in zip(first.candidate_rounds_ms, first.reference_rounds_ms)])
    assert first.ratio > 1  # 128x the multiply-adds: the sides are not swapped
    retrained = nn.Sequential(nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 64))  # same graph, new weights
    again = compare_latency(retrained, reference, x, rounds=4, number=5, cache_dir=tmp_path)
    assert again.cached and again.ratio == first.ratio
    assert not compare_latency(large, small, x, rounds=8, number=5, cache_dir=tmp_path, min_round_ms=1).cached
    with pytest.raises(ValueError, match="rounds and number"):
        compare_latency(large, reference, x, rounds=0)


def test_layer_table_measures_each_layer_once(tmp_path):
    table = LayerLatencyTable(cache_dir=tmp_path, repeat=3, number=3)
    fp32 = table.latency_ms("conv2d", 4, 8, kernel_size=3, padding=1, input_size=6)
    int8 = table.latency_ms("conv2d", 4, 8, kernel_size=3, padding=1, input_size=6, bits=8)
    int4 = table.measure(
        table_spec := __import__("lightning_relief.deploy", fromlist=["LayerSpec"]).LayerSpec.make(
            "conv2d", 4, 8, kernel_size=3, padding=1, input_size=6, bits=4
        )
    )
    assert fp32 > 0 and int8 > 0
    # 4-bit weights are stored and computed as int8: same graph, so the graph cache answers
    assert int4.cached and int4.median_ms == int8 and table_spec.bits == 4
    fresh = LayerLatencyTable(cache_dir=tmp_path, repeat=3, number=3)
    assert fresh.latency_ms("conv2d", 4, 8, kernel_size=3, padding=1, input_size=6) == fp32
    assert (fresh.hits, fresh.misses) == (1, 0)
    assert fresh.module_latency_ms(nn.Conv2d(4, 8, 3, padding=1), input_size=6) == fp32
    with pytest.raises(ValueError, match="bits must be one of"):
        table.latency_ms("linear", 4, 4, bits=3)
    with pytest.raises(ValueError, match="kind must be"):
        table.latency_ms("conv3d", 4, 4)


def test_targets_parse_old_strings_and_name_bad_ones():
    assert target_dict("llvm -mcpu=znver3 -num-cores=2") == {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}
    assert target_dict(resolve_target("llvm"))["mcpu"]  # "llvm" means this CPU
    assert target_dict('{"kind": "llvm", "mtriple": "aarch64-linux-gnu"}')["mtriple"] == "aarch64-linux-gnu"
    with pytest.raises(ValueError, match="'nonsense' is not a valid TVM target"):
        resolve_target("nonsense")


@pytest.mark.parametrize(
    ("target", "named"),
    [
        ("llvm -mcpu=nonsense", "mcpu='nonsense'"),
        ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "znver4"}, "mcpu='znver4' is not a CPU LLVM knows for aarch64"),
        ("llvm -mtriple=bogus-linux-gnu", "mtriple='bogus-linux-gnu'"),
    ],
)
def test_unknown_cpu_or_triple_is_refused_before_compiling(target, named, monkeypatch):
    # TVM accepts these, logs a warning and builds generic code; we refuse them up front
    import tvm

    from lightning_relief.deploy import ExportConfig, TargetError

    assert isinstance(tvm.target.Target(target_dict(target)), tvm.target.Target)
    monkeypatch.setattr(tvm, "compile", lambda *a, **k: pytest.fail("compiled a bad target"))
    for attempt in (
        lambda: resolve_target(target),
        lambda: ExportConfig(target=target),
        lambda: compile_for_target(nn.Linear(2, 2), torch.zeros(1, 2), target),
    ):
        with pytest.raises(TargetError, match=named):
            attempt()
    assert resolve_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"})  # valid ones pass


def test_relief_export_refuses_an_unknown_cpu(tmp_path, capsys):
    from lightning_relief.cli.export import main as export_main

    (tmp_path / "m.ckpt").write_bytes(b"never read: the target is checked first")
    with pytest.raises(SystemExit) as info:
        export_main(["--ckpt", str(tmp_path / "m.ckpt"), "--out", str(tmp_path / "out"), "--target", "llvm -mcpu=nonsense"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "mcpu='nonsense' is not a CPU LLVM knows" in err and "key 'target'" in err
    assert not (tmp_path / "out").exists()


def test_compiled_model_repr_and_type(lenet_compiled):
    _, compiled = lenet_compiled
    assert isinstance(compiled, CompiledModel)
    assert "x['batch', 1, 8, 8]" in repr(compiled)
