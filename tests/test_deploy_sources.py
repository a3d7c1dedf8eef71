"""Exports of models as users train them: recurrent layers, torch.compile, several targets in one fit."""

from __future__ import annotations

import json
import platform
import shutil
import sys

import pytest
import torch
from torch import nn
from tvm import relax

from lightning_relief import ClassifierModule, DigitsDataModule
from lightning_relief.callbacks.tvm_export import TVMExportCallback
from lightning_relief.deploy import ParityError, check_parity, compile_for_target, load_compiled
from lightning_relief.models import LeNet5


class LastSteps(nn.Module):
    """Negative indices on the batch, time and feature dimensions (``aten.select.int``)."""

    def forward(self, x):
        return x[:, -2] * x[-1, -1] + x[:, 1, -3].unsqueeze(1) + x[:, -4]


class TinyGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(1, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        _, h = self.gru(x)
        return self.head(h[-1])


@pytest.mark.parametrize("dynamic", [True, False])
def test_negative_indices_count_from_the_end(dynamic, seed):
    x = torch.randn(3, 4, 5)
    compiled = compile_for_target(LastSteps(), x, dynamic_batch=dynamic)
    torch.testing.assert_close(compiled(x), LastSteps()(x), atol=0, rtol=0)
    if dynamic:  # the GRU's last state, h[-1], as exported (TVM's own conversion read out of bounds)
        gru = TinyGRU().eval()
        xs = torch.randn(5, 6, 1)
        with torch.no_grad():
            expected = gru(xs)
        torch.testing.assert_close(compile_for_target(gru, xs)(xs), expected, atol=1e-5, rtol=1e-5)


def test_parity_failure_inside_a_recurrent_layer_names_it(seed):
    gru = TinyGRU().eval()
    x = torch.randn(8, 6, 1)

    def wrong_tanh(node, importer):  # a converter bug inside the GRU's cell
        return importer.block_builder.emit(relax.op.sigmoid(importer.env[node.args[0]]))

    compiled = compile_for_target(gru, x, custom_convert_map={"tanh.default": wrong_tanh})
    with pytest.raises(ParityError, match=r"first diverging layer: 'gru' \(GRU\)") as info:
        check_parity(gru, compiled, x)
    assert info.value.module_path == "gru" and info.value.layer_type == "GRU"


def test_two_export_callbacks_keep_their_own_state(tmp_path, trainer_factory, seed):
    generic = {"kind": "llvm", "num-cores": 1}  # plain x86-64 code: a second target that runs here
    host = TVMExportCallback(dirpath=tmp_path / "host", example_input_shape=(1, 1, 8, 8), measure=False)
    other = TVMExportCallback(generic, dirpath=tmp_path / "generic", example_input_shape=(1, 1, 8, 8), measure=False)
    assert host.state_key != other.state_key
    assert TVMExportCallback()._default_folder() != TVMExportCallback(generic)._default_folder()
    trainer = trainer_factory(max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[host, other])
    trainer.fit(ClassifierModule(LeNet5(input_size=8)), DigitsDataModule(size=8))
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    states = torch.load(tmp_path / "model.ckpt", weights_only=False)["callbacks"]
    for callback, folder in ((host, "host"), (other, "generic")):
        assert states[callback.state_key]["last_export"]["dirpath"] == str(tmp_path / folder)
        restored = TVMExportCallback(callback.target, dirpath=tmp_path / folder)
        restored.load_state_dict(states[restored.state_key])
        assert restored.last_export == callback.last_export
    meta = {f: json.loads((tmp_path / f / "metadata.json").read_text()) for f in ("host", "generic")}
    assert meta["generic"]["target"].get("mcpu") is None and meta["host"]["target"]["mcpu"]


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="needs Debian's gcc-aarch64-linux-gnu")
def test_board_preset_cross_compiles_for_aarch64(tmp_path, seed):
    from lightning_relief.deploy import BOARDS, export_model, library_arch

    summary = export_model(LeNet5(input_size=8).eval(), torch.zeros(1, 1, 8, 8), tmp_path / "rpi4", target="rpi4")
    assert library_arch(tmp_path / "rpi4" / "model.so") == "aarch64"
    assert "aarch64" in summary["not_run_here"] and "latency_ms" not in summary and "max_abs_error" not in summary
    meta = json.loads((tmp_path / "rpi4" / "metadata.json").read_text())
    assert meta["target"]["mcpu"] == BOARDS["rpi4"]["mcpu"] == "cortex-a72"
    assert library_arch(sys.executable) == platform.machine() != "aarch64"  # the check reads the header, not the name


def test_onnxruntime_backend_through_export_model(tmp_path, digits, seed):
    from lightning_relief.deploy import ExportConfig, OnnxRuntimeBackend, export_model, get_backend

    model = LeNet5(input_size=8).eval()
    x = next(iter(digits.val_dataloader()))[0][:16]
    summary = export_model(model, x, tmp_path / "ort", ExportConfig(backend="onnxruntime", repeat=2, number=2))
    assert summary["backend"] == "onnxruntime" and summary["top1_agreement"] == 1.0 and summary["max_abs_error"] < 1e-5
    assert summary["latency_batch_size"] == 1 and summary["latency_ms"] > 0
    loaded = get_backend("lightning_relief.deploy.onnx_backend.OnnxRuntimeBackend").load(tmp_path / "ort")
    assert isinstance(get_backend("onnxruntime"), OnnxRuntimeBackend)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x[:5]), model(x[:5]), atol=1e-5, rtol=1e-5)


def test_backend_errors_name_what_to_do():
    from lightning_relief.deploy import MissingExtraError, get_backend
    from lightning_relief.deploy.extras import require

    with pytest.raises(ValueError, match="unknown backend 'tensorrt'.*'onnxruntime', 'tvm'"):
        get_backend("tensorrt")
    with pytest.raises(TypeError, match="is not a Backend"):
        get_backend("collections.OrderedDict")
    with pytest.raises(MissingExtraError, match=r"pip install 'lightning-relief\[onnx\]'"):
        require("onnxruntime.no_such_part", "the ONNX Runtime backend")


def test_call_path_without_copies_keeps_results_apart(seed):
    model = LeNet5(input_size=8).eval()
    compiled = compile_for_target(model, torch.zeros(1, 1, 8, 8), dynamic_batch=False)
    a, b = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8)
    first = compiled(a)
    kept = first.clone()
    second = compiled(b)  # a later call must not write into the first result (outputs are DLPack views)
    with torch.no_grad():
        torch.testing.assert_close(first, kept, atol=0, rtol=0)
        torch.testing.assert_close(first, model(a), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(second, model(b), atol=1e-5, rtol=1e-5)
        unaligned = torch.randn(65)[1:].view(1, 1, 8, 8)  # TVM takes only 64-byte aligned buffers as they are
        torch.testing.assert_close(compiled(unaligned), model(unaligned), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.from_numpy(compiled(b.numpy())), model(b), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"expected shape \[1, 1, 8, 8\]"):
        compiled(torch.zeros(2, 1, 8, 8))
    # after the checks above the short path of a repeated call still checks what it skips
    with pytest.raises(ValueError, match="dtype float32, got .* float64"):
        compiled(torch.zeros(1, 1, 8, 8, dtype=torch.float64))
    grad = torch.randn(1, 1, 8, 8, requires_grad=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(grad), model(grad), atol=1e-5, rtol=1e-5)
        compiled._invoke = None  # a repeated call (same shape, CPU tensor) takes the short path
        torch.testing.assert_close(compiled(a), model(a), atol=1e-5, rtol=1e-5)


def test_export_after_fitting_a_compiled_module(tmp_path, trainer_factory, seed):
    """``trainer.fit(torch.compile(module))`` leaves dynamo-wrapped methods on the module; BN in it."""
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
    module = ClassifierModule(net)
    inner = ClassifierModule(torch.compile(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), backend="eager"))
    for fitted, source, folder in ((torch.compile(module, backend="eager"), module, "outer"), (inner, inner, "inner")):
        export = TVMExportCallback(dirpath=tmp_path / folder, example_input_shape=(1, 1, 8, 8), measure=False, strict=True)
        trainer = trainer_factory(max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[export])
        trainer.fit(fitted, DigitsDataModule(size=8))
        x = torch.randn(5, 1, 8, 8)
        source.eval()
        with torch.no_grad():
            torch.testing.assert_close(load_compiled(tmp_path / folder)(x), source(x), atol=1e-5, rtol=1e-5)
    assert module._compiler_ctx is not None, "the trained module keeps its compiled methods"
