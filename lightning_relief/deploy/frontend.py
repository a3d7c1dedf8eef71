"""PyTorch → Relax: ``torch.export`` then TVM's ExportedProgram importer.

The model is deep-copied and put in eval mode first, so export never changes
the caller's model. Operators the importer cannot convert are found *before*
conversion and reported with the module that uses them. Integer arithmetic
written with plain tensor ops (see :mod:`lightning_relief.deploy.quantized`)
is rewritten so that conv/matmul take int8 operands and accumulate in int32.
"""

from __future__ import annotations

import copy
import hashlib
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import tvm
from torch import Tensor, nn
from tvm import relax

from lightning_relief.deploy.errors import DeployError, UnsupportedOperatorError

BATCH_DIM = "batch"
_DROP = object()
_MAX_BATCH = 1 << 16
_MAX_INDEX = (1 << 63) - 1


@dataclass
class RelaxGraph:
    """A model imported into Relax, parameters detached (``main(*inputs, *params)``)."""

    mod: tvm.IRModule
    params: list[np.ndarray]
    inputs: list[dict[str, Any]]  # name, shape (None = dynamic batch), dtype
    outputs: list[dict[str, Any]]
    single_output: bool
    dynamic_batch: bool
    graph_hash: str = ""
    param_names: list[str] = field(default_factory=list)


def as_input_tuple(example_inputs: Any) -> tuple[Tensor, ...]:
    """A tensor, array or sequence of them → a tuple of CPU tensors."""
    if isinstance(example_inputs, (Tensor, np.ndarray)):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, Sequence) or not example_inputs:
        raise TypeError(
            f"example_inputs must be a tensor or a non-empty sequence of tensors, got {type(example_inputs).__name__}"
        )
    out = []
    for i, x in enumerate(example_inputs):
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not isinstance(x, Tensor):
            raise TypeError(f"example_inputs[{i}] must be a tensor or array, got {type(x).__name__}")
        out.append(x.detach().cpu())
    return tuple(out)


# Lightning's ``from_compiled`` (``trainer.fit(torch.compile(module))``) puts dynamo-wrapped methods
# in the instance dict; exporting through them fails ("Constant lifted_tensor_... is mutated")
_COMPILED_METHODS = ("forward", "training_step", "validation_step", "test_step", "predict_step")


def _is_compiled(module: nn.Module) -> bool:
    return hasattr(module, "_orig_mod") and type(module).__name__ == "OptimizedModule"


def frozen_copy(model: nn.Module) -> nn.Module:
    """A CPU copy in eval mode without gradients, ``torch.compile`` wrappers removed; the original is not touched.

    Parameters and buffers are copied straight to the CPU (a CUDA-trained model is never duplicated on
    its GPU); ``OptimizedModule`` wrappers (``torch.compile``) are replaced by the modules they wrap.

    >>> import torch
    >>> net = torch.compile(torch.nn.Linear(2, 2))
    >>> type(frozen_copy(net)).__name__, frozen_copy(net).weight.device.type
    ('Linear', 'cpu')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    held: dict[str, Any] = {}
    if model.__dict__.get("_trainer") is not None:  # a LightningModule: do not copy the Trainer with it
        held["_trainer"] = None
    if model.__dict__.get("_compiler_ctx"):
        held.update({"_compiler_ctx": None, **{name: _DROP for name in _COMPILED_METHODS if name in model.__dict__}})
    saved = {name: model.__dict__[name] for name in held}
    memo: dict[int, Any] = {}
    for module in model.modules():
        for tensor in (*module._parameters.values(), *module._buffers.values()):
            if tensor is not None and id(tensor) not in memo:
                cpu = tensor.detach().to("cpu", copy=True)
                memo[id(tensor)] = nn.Parameter(cpu, requires_grad=False) if isinstance(tensor, nn.Parameter) else cpu
    # innermost first, so an outer wrapper's copy already finds its inner copies in the memo
    for module in reversed(list(model.modules())):
        if _is_compiled(module):
            memo[id(module)] = copy.deepcopy(module._orig_mod, memo)
    try:
        for name, value in held.items():
            if value is _DROP:
                del model.__dict__[name]
            else:
                model.__dict__[name] = value
        clone = copy.deepcopy(model, memo)
    finally:
        model.__dict__.update(saved)
    clone = clone.to("cpu")  # tensors held as plain attributes
    clone.eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def _trace_inputs(inputs: tuple[Tensor, ...], dynamic_batch: bool) -> tuple[tuple[Tensor, ...], bool]:
    if not dynamic_batch:
        return inputs, False
    sizes = {x.shape[0] if x.dim() else None for x in inputs}
    if len(sizes) != 1 or None in sizes:
        return inputs, False  # no shared leading batch dimension
    if next(iter(sizes)) == 1:  # torch.export specialises size-1 dims: trace with two rows
        inputs = tuple(torch.cat([x, x]) for x in inputs)
    return inputs, True


def export_program(
    model: nn.Module, inputs: tuple[Tensor, ...], dynamic_batch: bool
) -> tuple[torch.export.ExportedProgram, bool]:
    """``torch.export`` with a dynamic batch dimension where the model allows one."""
    traced, dynamic = _trace_inputs(inputs, dynamic_batch)
    if dynamic:
        batch = torch.export.Dim(BATCH_DIM, min=1, max=_MAX_BATCH)
        try:
            ep = torch.export.export(model, traced, dynamic_shapes=tuple({0: batch} for _ in traced), strict=False)
            return ep, True
        except Exception as err:  # the model fixes its batch size somewhere: export it static
            warnings.warn(f"exporting with a fixed batch size {inputs[0].shape[0]}: {str(err).splitlines()[0]}", stacklevel=3)
    try:
        return torch.export.export(model, inputs, strict=False), False
    except Exception as err:
        raise DeployError(f"torch.export failed for {type(model).__name__}: {str(err).splitlines()[0]}") from err


_CONV_OPS = ("conv1d", "conv2d", "conv3d")
_BATCH_NORM_OPS = ("batch_norm", "_native_batch_norm_legit_no_training")


def _op_name(node: torch.fx.Node) -> str:
    packet = getattr(node.target, "overloadpacket", None)
    return getattr(packet, "__name__", "") if node.op == "call_function" else ""


def fold_batch_norm(model: nn.Module, ep: torch.export.ExportedProgram) -> int:
    """Fold each eval-mode batch norm into the convolution that alone feeds it, in ``model`` (a frozen copy).

    TVM's importer keeps batch norm as its own operator, and MetaSchedule then tunes kernels that
    compute ``(conv - mean) / std * gamma + beta`` per output element; folded, a convolution has a
    bias only (as ONNX Runtime does it). The pairs come from ``ep`` (the export of ``model``), so
    functional forwards fold too; a convolution whose output is used elsewhere as well (a parity
    probe's captured layer output), a module called twice or a batch norm that uses batch
    statistics is left alone. Returns how many were folded; export ``model`` again to see them.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)).eval()
    >>> ep = torch.export.export(net, (torch.zeros(1, 1, 5, 5),))
    >>> fold_batch_norm(net, ep), type(net[1]).__name__
    (1, 'Identity')
    """
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    signature = ep.graph_signature
    owners = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}

    def owner(arg: Any, suffix: str) -> str | None:
        """The module path of the parameter/buffer ``arg`` (a placeholder used by one node only)."""
        if not isinstance(arg, torch.fx.Node) or arg.op != "placeholder" or len(arg.users) != 1:
            return None
        name = owners.get(arg.name, "")
        return name[: -len(suffix)] if name.endswith(suffix) else None

    folded = 0
    for node in ep.graph.nodes:
        if _op_name(node) not in _BATCH_NORM_OPS:
            continue
        conv = node.args[0]
        if not isinstance(conv, torch.fx.Node) or _op_name(conv) not in _CONV_OPS or len(conv.users) != 1:
            continue
        if _op_name(node) == "batch_norm" and node.args[5]:  # training=True: batch statistics
            continue
        conv_path, bn_path = owner(conv.args[1], ".weight"), owner(node.args[3], ".running_mean")
        if conv_path is None or bn_path is None:
            continue
        conv_module, bn = model.get_submodule(conv_path), model.get_submodule(bn_path)
        if type(conv_module) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d) or not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            continue
        if bn.running_mean is None or bn.running_var is None:
            continue
        weight, bias = fuse_conv_bn_weights(
            conv_module.weight, conv_module.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        conv_module.weight, conv_module.bias = weight.requires_grad_(False), bias.requires_grad_(False)
        parent, _, leaf = bn_path.rpartition(".")
        setattr(model.get_submodule(parent), leaf, nn.Identity())
        folded += 1
    return folded


def _module_of(node: torch.fx.Node) -> tuple[str, str | None]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<top level>", None
    path, type_name = list(stack.values())[-1]
    path = str(path) or "<top level>"
    type_name = getattr(type_name, "__name__", None) or str(type_name).rsplit(".", 1)[-1].rstrip("'>")
    return path, type_name


def check_supported(ep: torch.export.ExportedProgram, custom_convert_map: dict[str, Callable] | None = None) -> None:
    """Raise :class:`UnsupportedOperatorError` naming the first unconvertible operator and its module."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    known = set(ExportedProgramImporter().create_convert_map()) | set(custom_convert_map or {})
    missing: list[tuple[str, str, str | None]] = []
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name not in known:
            missing.append((name, *_module_of(node)))
    if missing:
        op, path, type_name = missing[0]
        others = sorted({f"'{m[0]}' in '{m[1]}'" for m in missing[1:] if (m[0], m[1]) != (op, path)})
        raise UnsupportedOperatorError(op, path, type_name, others)


def _spec_of(tensor_type: Any, name: str) -> dict[str, Any]:
    # symbolic dimensions (the dynamic batch) are recorded as None
    shape = [int(d.value) if type(d).__name__ == "IntImm" else None for d in tensor_type.shape.values]
    return {"name": name, "shape": shape, "dtype": str(tensor_type.dtype)}


# scalar float constants are values, not structure: the quantizer scales of an integer-lowered model
# are written inline, and retraining changes them without changing what the code computes or costs
_FLOAT_SCALAR = re.compile(r'R\.const\((?:[-+0-9.eE]+|-?inf|nan), "float(?:16|32|64)"\)')


def graph_hash(mod: tvm.IRModule) -> str:
    """Hash of the graph's structure and shapes (not of the weight values or scalar float constants)."""
    script = _FLOAT_SCALAR.sub("R.const(_)", mod.script(show_meta=False))
    return hashlib.sha256(script.encode()).hexdigest()[:24]


def _select(node: torch.fx.Node, importer: Any) -> relax.Var:
    """``aten.select.int`` with Python's negative indices.

    TVM 0.27's converter emits ``take(x, index, mode="fast")``, which reads out of bounds for a
    negative index: ``h[-1]`` (the last GRU/LSTM layer's state) returned garbage (errors of 1e17).
    A strided slice counts negative starts from the end, on static and dynamic dimensions alike.
    """
    x = importer.env[node.args[0]]
    dim, index = int(node.args[1]), int(node.args[2])
    end = index + 1 if index != -1 else _MAX_INDEX
    part = importer.block_builder.emit(relax.op.strided_slice(x, axes=[dim], begin=[index], end=[end]))
    return importer.block_builder.emit(relax.op.squeeze(part, axis=[dim]))


# our converters for operators TVM's importer gets wrong; a user's custom_convert_map takes precedence
CONVERTER_FIXES: dict[str, Callable] = {"select.int": _select}


def to_relax(
    model: nn.Module,
    example_inputs: Any,
    dynamic_batch: bool = True,
    custom_convert_map: dict[str, Callable] | None = None,
    integer_rewrite: bool = True,
    batch_norm_folding: bool = True,
) -> RelaxGraph:
    """Import ``model`` (a frozen copy of it) into Relax with parameters detached.

    Eval-mode batch norms are folded into the convolutions before them (:func:`fold_batch_norm`)
    unless ``batch_norm_folding=False``."""
    from tvm.relax.frontend.torch import from_exported_program

    inputs = as_input_tuple(example_inputs)
    clone = frozen_copy(model)
    with torch.no_grad():
        ep, dynamic = export_program(clone, inputs, dynamic_batch)
        if batch_norm_folding and fold_batch_norm(clone, ep):
            ep, dynamic = export_program(clone, inputs, dynamic)
    ep = ep.run_decompositions()
    check_supported(ep, custom_convert_map)
    try:
        mod = from_exported_program(
            ep,
            keep_params_as_input=True,
            custom_convert_map={**CONVERTER_FIXES, **(custom_convert_map or {})},
            run_ep_decomposition=False,
        )
    except Exception as err:
        raise DeployError(f"TVM could not import {type(model).__name__}: {str(err).splitlines()[-1]}") from err
    if integer_rewrite:
        from lightning_relief.deploy.int_rewrite import IntegerOperands

        mod = IntegerOperands()(mod)
    mod, params = relax.frontend.detach_params(mod)
    func = mod["main"]
    num_input = int(func.attrs["num_input"])
    ins = [_spec_of(p.ty, p.name) for p in func.params[:num_input]]
    ret = func.ret_ty
    fields = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    outs = [_spec_of(f, f"output{i}") for i, f in enumerate(fields)]
    out_spec = ep.call_spec.out_spec
    single = out_spec is not None and out_spec.is_leaf()
    return RelaxGraph(
        mod=mod,
        params=[p.numpy() for p in params.get("main", [])],
        inputs=ins,
        outputs=outs,
        single_output=bool(single),
        dynamic_batch=dynamic,
        graph_hash=graph_hash(mod),
        param_names=[p.name for p in func.params[num_input:]],
    )
