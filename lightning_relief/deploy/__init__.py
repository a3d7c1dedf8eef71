"""Deployment through Apache TVM: compile, measure, lower quantized models, export.

Public API (other plugins build on these names):

* :func:`compile_for_target` ``(model, example_inputs, target="llvm", tuning=None, ...) -> CompiledModel``:
  ``torch.export`` → Relax → ``tvm.compile``; tuple outputs (mean, variance) and
  ensembles compile like any model; dynamic batch when untuned.
* :class:`CompiledModel` (call it on numpy or torch inputs; ``save(dir)``) and
  :func:`load_compiled` ``(dir)``, which needs neither PyTorch nor the model code.
* :func:`measure_latency` ``(model_or_compiled, example_inputs, target="llvm", repeat=10, number=10,
  cache_dir=None, tuning=None, *, cache=True, remote=None) -> LatencyResult``
  (``median_ms``, ``iqr_ms``, ``std_ms``, ``repeat``, ``number``, ``cached``), cached on disk.
* :func:`compare_latency` ``(candidate, reference, example_inputs, target="llvm", rounds=10, number=10,
  tuning=None, cache_dir=None, *, cache=True) -> LatencyRatio``: the latency ratio of two models
  timed in alternation, steady on a machine whose speed drifts.
* :class:`LayerLatencyTable` ``(target="llvm", cache_dir=None, tuning=None, batch=1)`` with
  ``latency_ms(kind, in_channels, out_channels, kernel_size=1, stride=1, padding=0, groups=1,
  input_size=1, bits=None)``: one conv2d/linear layer compiled alone, cached (the cost
  model of ``SensitivityPruningCallback``).
* :class:`TuningConfig` ``(trials=64, trials_per_task=None, trials_per_round=4, work_dir=None, weight_prepack=True)``:
  MetaSchedule tuning (trials go where latency × weight is) with a database reused across layers, runs and exports.
* :func:`lower_quantized` ``(model, example_inputs=None) -> nn.Module``: brevitas layers →
  int8 weights, int32 accumulation, requantization, in plain tensor ops.
* :class:`ExportConfig` and :func:`export_model` ``(model, example, dirpath, config=None, ...)``: the
  export step of ``TVMExportCallback`` and ``relief export`` (board presets: :data:`BOARDS`).
* :func:`get_backend` ``("tvm" | "onnxruntime" | "pkg.module.Class") -> Backend``: the seam,
  ``Backend.compile(model, example, config) -> Artifact`` (``__call__``, ``time``, ``save``; ``Backend.load``).
* :func:`check_parity` and :class:`RemoteDevice` / :func:`local_rpc_server` (TVM RPC).

Names load lazily, so ``from lightning_relief.deploy import load_compiled`` on a
deployment host does not import PyTorch.
"""

from __future__ import annotations

from lightning_relief._lazy import lazy_exports

_EXPORTS = {
    "compile_for_target": "lightning_relief.deploy.compile",
    "build_graph": "lightning_relief.deploy.compile",
    "CompiledModel": "lightning_relief.deploy.artifact",
    "load_compiled": "lightning_relief.deploy.artifact",
    "measure_latency": "lightning_relief.deploy.latency",
    "LatencyResult": "lightning_relief.deploy.latency",
    "compare_latency": "lightning_relief.deploy.compare",
    "LatencyRatio": "lightning_relief.deploy.compare",
    "LayerLatencyTable": "lightning_relief.deploy.layer_table",
    "LayerSpec": "lightning_relief.deploy.layer_table",
    "TuningConfig": "lightning_relief.deploy.tuning",
    "lower_quantized": "lightning_relief.deploy.quantized",
    "IntegerConv1d": "lightning_relief.deploy.quantized",
    "IntegerConv2d": "lightning_relief.deploy.quantized",
    "IntegerLinear": "lightning_relief.deploy.quantized",
    "FakeQuantize": "lightning_relief.deploy.quantized",
    "check_parity": "lightning_relief.deploy.parity",
    "ParityReport": "lightning_relief.deploy.parity",
    "RemoteDevice": "lightning_relief.deploy.rpc",
    "local_rpc_server": "lightning_relief.deploy.rpc",
    "to_relax": "lightning_relief.deploy.frontend",
    "resolve_target": "lightning_relief.deploy.targets",
    "host_target_dict": "lightning_relief.deploy.targets",
    "DeployError": "lightning_relief.deploy.errors",
    "TargetError": "lightning_relief.deploy.errors",
    "ExportConfig": "lightning_relief.deploy.config",
    "Backend": "lightning_relief.deploy.backend",
    "Artifact": "lightning_relief.deploy.backend",
    "get_backend": "lightning_relief.deploy.backend",
    "TVMBackend": "lightning_relief.deploy.tvm_backend",
    "OnnxRuntimeBackend": "lightning_relief.deploy.onnx_backend",
    "OnnxArtifact": "lightning_relief.deploy.onnx_artifact",
    "MissingExtraError": "lightning_relief.deploy.extras",
    "export_model": "lightning_relief.deploy.export",
    "BOARDS": "lightning_relief.deploy.targets",
    "library_arch": "lightning_relief.deploy.artifact",
    "UnsupportedOperatorError": "lightning_relief.deploy.errors",
    "ParityError": "lightning_relief.deploy.errors",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
