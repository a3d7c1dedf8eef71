"""Trace a network with ``torch.fx`` and build its moment-propagating twin as a new graph.

The traced graph is walked once. A node whose inputs are all deterministic is
copied unchanged (so the layers before the first dropout run exactly as before,
at their normal cost); a node that touches a random value is replaced by the
rule from :mod:`lightning_relief.moments.rules`, which emits the computation of
its output's mean and variance. The result is an ``fx.GraphModule`` of plain
tensor operations, which ``torch.export`` captures as one graph.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate

from lightning_relief.moments import functional as MF
from lightning_relief.moments import low_rank as LR
from lightning_relief.moments.rules import (
    FUNCTION_RULES,
    METHOD_RULES,
    MODULE_RULES,
    STOCHASTIC_FUNCTIONS,
    STOCHASTIC_MODULES,
    Moments,
    RuleContext,
    Step,
    Tape,
    UnsupportedOperationError,
    _module_quadrature,
    bayesian_layer_types,
    factor_update,
    logit_sources,
    module_rule,
)

Output = Literal["moments", "probs", "log_probs", "factor"]
MODEL_PREFIX = "model."
CONSTANTS_PREFIX = "constants."


def has_moment_protocol(module: nn.Module) -> bool:
    """Whether ``module`` propagates moments itself through ``propagate_moments(mean, var)``."""
    return callable(getattr(module, "propagate_moments", None))


class MomentTracer(fx.Tracer):
    """An fx tracer that keeps layers with a moment rule, or their own, as single calls."""

    def __init__(self, leaf_types: Sequence[type] = ()) -> None:
        super().__init__()
        self.record_stack_traces = True
        self._leaf_types = tuple(leaf_types) + bayesian_layer_types()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if has_moment_protocol(m) or isinstance(m, self._leaf_types):
            return True
        if isinstance(m, nn.TransformerEncoderLayer):
            return False  # traced through _plain_encoder_layer: its parts have rules
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if isinstance(m, nn.TransformerEncoderLayer) and not self.is_leaf_module(m, ""):
            forward = functools.partial(_plain_encoder_layer, m)
        return super().call_module(m, forward, args, kwargs)


def _plain_encoder_layer(
    layer: nn.TransformerEncoderLayer, src: Any, src_mask: Any = None, src_key_padding_mask: Any = None,
    is_causal: bool = False,
) -> Any:  # fmt: skip
    # PyTorch's forward without its fast-path checks (which branch on tensor properties and
    # cannot be traced); the computation of its regular path, module by module
    x = src
    if layer.norm_first:
        x = x + layer._sa_block(layer.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        return x + layer._ff_block(layer.norm2(x))
    x = layer.norm1(x + layer._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
    return layer.norm2(x + layer._ff_block(x))


def trace(model: nn.Module, leaf_types: Sequence[type] = ()) -> fx.GraphModule:
    """``torch.fx``-trace ``model``; a failure names the model and says why."""
    tracer = MomentTracer(leaf_types)
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises many types (TraceError, TypeError, RuntimeError)
        raise UnsupportedOperationError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(err).__name__}: {err}); moment propagation "
            "needs a forward without Python control flow on tensor values",
            module_path="",
            layer_type=type(model).__name__,
        ) from err
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def unreached_random_layers(model: nn.Module, leaf_types: Sequence[type] = ()) -> list[str]:
    """Dropout and Gaussian-weight layers that the (eval-mode) trace does not reach.

    A dropout guarded by ``if self.training:`` is skipped when the network is traced
    in eval mode and would silently contribute no variance. Modules are found by
    their absence from the trace; functional dropout by tracing once more in train
    mode and comparing. Modules inside a layer that is not traced into count as reached.
    """
    if has_moment_protocol(model):  # not traced into: it carries its own rule
        return []
    stochastic = STOCHASTIC_MODULES + bayesian_layer_types()
    graph = trace(model, leaf_types).graph
    called = [str(n.target) for n in graph.nodes if n.op == "call_module"]
    missed = [
        f"module '{name}' ({type(m).__name__})"
        for name, m in model.named_modules()
        if isinstance(m, stochastic) and not any(name == c or name.startswith(c + ".") for c in called)
    ]
    modes = {m: m.training for m in model.modules()}
    try:
        model.train()
        train_graph = MomentTracer(leaf_types).trace(model)
    except Exception:  # a forward that traces only in eval mode: nothing to compare with
        return missed
    finally:
        for m, mode in modes.items():
            m.train(mode)

    def functional(g: fx.Graph) -> list[tuple[str, str]]:
        return [
            (_module_path(n), _short(n, None)) for n in g.nodes if n.op == "call_function" and n.target in STOCHASTIC_FUNCTIONS
        ]

    reached = functional(graph)
    for path, name in functional(train_graph):
        if (path, name) in reached:
            reached.remove((path, name))
        else:
            missed.append(f"{name} in module '{path}'" if path else f"{name} in the root forward")
    return missed


def _module_path(node: fx.Node) -> str:
    """The dotted path of the module a node is, or sits in (``""`` for the root)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def _location(node: fx.Node) -> str:
    """Where a node comes from: module path, node name and the user's source line."""
    parts = []
    if node.op == "call_module":
        parts.append(f"module '{node.target}'")
    else:
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            path = next(reversed(stack.values()))[0]
            if path:
                parts.append(f"in module '{path}'")
    parts.append(f"node '{node.name}'")
    trace_text = node.meta.get("stack_trace") or ""
    frames = [
        (file, line)
        for file, line in re.findall(r'File "([^"]+)", line (\d+)', trace_text)
        if "/torch/" not in file and "/lightning_relief/moments/" not in file
    ]
    if frames:
        file, line = frames[-1]
        parts.append(f"{file.rsplit('/', 1)[-1]}:{line}")
    return ", ".join(parts)


def _short(node: fx.Node, module: nn.Module | None) -> str:
    """The layer type as a user names it: ``GRU``, ``gelu``, ``Tensor.cumsum``."""
    if module is not None:
        return type(module).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return str(getattr(node.target, "__name__", node.target))


def _refuse_after_softmax(args: Any, kwargs: Any) -> None:
    def visit(v: Any) -> Any:
        if isinstance(v, Moments) and v.before_softmax:
            raise UnsupportedOperationError(
                f"{v.before_softmax} is only supported at the output (the logits' moments are returned), not inside the network"
            )
        return v

    map_aggregate((args, kwargs), visit)


def supported_modules() -> list[str]:
    """Names of the module classes that have a moment rule."""
    return sorted({cls.__name__ for cls in MODULE_RULES} | {cls.__name__ for cls in bayesian_layer_types()})


def _describe(node: fx.Node, module: nn.Module | None) -> str:
    if module is not None:
        return f"{type(module).__module__}.{type(module).__name__}"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    return f"{getattr(target, '__module__', None) or ''}.{getattr(target, '__name__', target)}".lstrip(".")


def _contains_moments(value: Any) -> bool:
    found = False

    def visit(v: Any) -> Any:
        nonlocal found
        found = found or isinstance(v, Moments)
        return v

    map_aggregate(value, visit)
    return found


def _protocol_call(module: nn.Module, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return module.propagate_moments(mean, var)


def _output_moments(ctx: RuleContext, value: Any) -> Moments:
    if isinstance(value, Moments):
        if value.before_softmax:
            warnings.warn(
                f"the network ends in {value.before_softmax}: moment propagation returns the moments of the "
                "logits before it (use output='probs' or 'log_probs' for the predictive distribution)",
                stacklevel=3,
            )
            return Moments(value.mean, value.var, tape=value.tape)
        return value
    if isinstance(value, (tuple, list)):
        found = [v for v in value if isinstance(v, Moments)]
        if len(found) == 1:  # e.g. (logits, kl) from a network with bayesian-torch layers
            return _output_moments(ctx, found[0])
        raise UnsupportedOperationError(
            f"the network returns a {type(value).__name__} with {len(found)} random outputs; "
            "moment propagation needs exactly one (the logits)"
        )
    if isinstance(value, fx.Node):
        warnings.warn(
            "the network has no dropout, Gaussian-weight or moment-propagating layer: its output variance is zero",
            stacklevel=3,
        )
        return ctx.moments(value)
    raise UnsupportedOperationError(f"the network returns {type(value).__name__}, not a tensor")


def build_moment_graph(
    model: nn.Module,
    *,
    random_input: bool = False,
    output: Output = "moments",
    leaf_types: Sequence[type] = (),
    softmax: MF.SoftmaxMethod = "daunizeau",
    elementwise: Sequence[type] = (),
    covariance: str = "diagonal",
) -> tuple[fx.GraphModule, dict[str, torch.Tensor]]:
    """The moment-propagating graph of ``model``.

    Returns the graph module (inputs ``x``, or ``mean, var`` when ``random_input``)
    and the tensor constants the trace created. The graph reaches the model's
    modules and parameters through the attribute ``model`` and the constants
    through ``constants``; the caller sets both (see ``MomentPropagationWrapper``).
    """
    graph = fx.Graph()
    ctx = RuleContext(
        graph, model, MODEL_PREFIX, low_rank=covariance == "low_rank",
        last_layer=output == "factor" and covariance != "low_rank",
    )  # fmt: skip
    constants: dict[str, torch.Tensor] = {}

    if has_moment_protocol(model):  # the whole model carries its own rule
        mean = graph.placeholder("mean")
        var = graph.placeholder("var") if random_input else ctx.call(torch.zeros_like, mean)
        moments = ctx.pair(graph.call_function(_protocol_call, (graph.get_attr("model"), mean, var)))
        return _finish(model, graph, ctx, moments, output, constants, softmax)

    elementwise = tuple(elementwise)
    traced = trace(model, tuple(leaf_types) + elementwise)
    modules = dict(traced.named_modules())
    stochastic_modules = STOCHASTIC_MODULES + bayesian_layer_types()
    env: dict[fx.Node, Any] = {}
    result: Any = None
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            if node is not placeholders[0]:
                if node.args:  # an optional forward argument: its default is baked in
                    env[node] = node.args[0]
                    continue
                raise UnsupportedOperationError(
                    f"forward of {type(model).__name__} takes more than one required input ({node.name!r})"
                )
            if random_input:
                env[node] = Moments(graph.placeholder("mean"), graph.placeholder("var"))
                if ctx.low_rank:  # the input's noise: one source per unit, shared by everything computed from it
                    source = Step(LR.diag_sources, (ctx.call(torch.sqrt, env[node].var),), source=True)
                    env[node] = replace(env[node], tape=Tape((source,), env[node].var))
            else:
                env[node] = graph.placeholder(node.name)
            continue
        if node.op == "get_attr":
            holder, _, name = node.target.rpartition(".")
            if _has_attr(model, node.target):
                env[node] = graph.get_attr(MODEL_PREFIX + node.target)
            else:  # a tensor constant the tracer created (torch.tensor(...) inside forward)
                key = node.target.replace(".", "_")
                constants[key] = getattr(traced.get_submodule(holder) if holder else traced, name)
                env[node] = graph.get_attr(CONSTANTS_PREFIX + key)
            continue
        if node.op == "output":
            result = map_aggregate(node.args[0], lambda n: env[n] if isinstance(n, fx.Node) else n)
            continue

        args = map_aggregate(node.args, lambda n: env[n] if isinstance(n, fx.Node) else n)
        kwargs = map_aggregate(node.kwargs, lambda n: env[n] if isinstance(n, fx.Node) else n)
        random = _contains_moments(args) or _contains_moments(kwargs)
        module = modules[node.target] if node.op == "call_module" else None
        where = {"module_path": _module_path(node), "layer_type": _short(node, module)}
        try:
            _refuse_after_softmax(args, kwargs)
            env[node] = _convert_node(ctx, node, module, tuple(args), dict(kwargs), random, stochastic_modules, elementwise)
            if ctx.low_rank or ctx.last_layer:
                env[node] = factor_update(ctx, node, module, tuple(args), env[node])
        except UnsupportedOperationError as err:
            raise UnsupportedOperationError(f"{err} (at {_location(node)})", **where) from None
        except (TypeError, ValueError) as err:
            raise UnsupportedOperationError(
                f"{_describe(node, module)} cannot be converted: {err} (at {_location(node)})", **where
            ) from err

    return _finish(model, graph, ctx, _output_moments(ctx, result), output, constants, softmax)


def _has_attr(model: nn.Module, path: str) -> bool:
    obj: Any = model
    for part in path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _convert_node(
    ctx: RuleContext,
    node: fx.Node,
    module: nn.Module | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    random: bool,
    stochastic_modules: tuple[type, ...],
    elementwise: tuple[type, ...] = (),
) -> Any:
    graph = ctx.graph
    if node.op == "call_module":
        if has_moment_protocol(module):
            x = ctx.moments(args[0])
            return ctx.pair(graph.call_function(_protocol_call, (ctx.attr(node.target), x.mean, x.var)))
        # attention dropout is functional inside MultiheadAttention: with it, the block is random even for a
        # deterministic input (and sampled)
        attention_dropout = isinstance(module, nn.MultiheadAttention) and module.dropout > 0
        if not random and not isinstance(module, stochastic_modules) and not attention_dropout:
            return graph.call_module(MODEL_PREFIX + node.target, args, kwargs)
        handler = _module_quadrature if isinstance(module, elementwise) else module_rule(module)
        if handler is None:
            raise UnsupportedOperationError(
                f"no moment rule for {_describe(node, module)}; supported modules: {', '.join(supported_modules())}; "
                "an elementwise activation can be declared with elementwise=(its class,)"
            )
        return handler(ctx, node, module, args, kwargs)

    if node.op == "call_function":
        if not random and node.target not in STOCHASTIC_FUNCTIONS:
            return graph.call_function(node.target, args, kwargs)
        handler = FUNCTION_RULES.get(node.target)
    elif node.op == "call_method":
        if not random:
            return graph.call_method(node.target, args, kwargs)
        handler = METHOD_RULES.get(node.target)
    else:
        raise UnsupportedOperationError(f"unexpected graph node kind {node.op!r}")
    if handler is None:
        raise UnsupportedOperationError(f"no moment rule for {_describe(node, None)}")
    return handler(ctx, node, module, args, kwargs)


def _finish(
    model: nn.Module,
    graph: fx.Graph,
    ctx: RuleContext,
    result: Moments,
    output: Output,
    constants: dict[str, torch.Tensor],
    softmax: MF.SoftmaxMethod,
) -> tuple[fx.GraphModule, dict[str, torch.Tensor]]:
    factor = None
    if ctx.low_rank or ctx.last_layer:
        var, factor = logit_sources(ctx, result)
        if ctx.low_rank:  # the per-unit modes keep their variance; the factor is for the scores only
            result = replace(result, var=var)
    if output == "moments":
        graph.output((result.mean, result.var))
    elif output == "factor":  # the logits' moments and shared sources [N, K, C] (K = 0 without)
        graph.output((result.mean, result.var, factor if factor is not None else ctx.call(LR.no_sources, result.mean)))
    elif output == "log_probs":
        graph.output(ctx.call(MF.softmax_log_probs, result.mean, result.var, -1, softmax))
    elif output == "probs":
        graph.output(ctx.call(MF.softmax_probs, result.mean, result.var, -1, softmax))
    else:
        raise ValueError(f"output must be 'moments', 'probs' or 'log_probs', got {output!r}")
    root = nn.Module()
    root.model = model
    root.constants = nn.Module()
    for name, value in constants.items():
        root.constants.register_buffer(name, value, persistent=False)
    module = fx.GraphModule(root, graph, "MomentGraph")
    # GraphModule copied only the referenced attributes into a new hierarchy; point it at the real
    # model so that every access resolves at call time (after .to(), load_state_dict, ...)
    module.model = model
    module.constants = root.constants
    module.graph.eliminate_dead_code()  # e.g. the KL terms of bayesian-torch layers
    module.graph.lint()
    module.recompile()
    return module, constants


__all__ = [
    "MomentTracer", "Output", "build_moment_graph", "has_moment_protocol", "supported_modules", "trace",
    "unreached_random_layers",
]  # fmt: skip
