"""Which rule handles which operation of a traced network, and how it is emitted.

The converter (:mod:`lightning_relief.moments.convert`) walks a ``torch.fx`` graph;
for every node that touches a random value it looks up a handler here by module
type, function or method name. A handler emits the moment computation into the
new graph through a :class:`RuleContext` and returns the result as
:class:`Moments` (a mean node and a variance node) or as a plain value.
"""

from __future__ import annotations

import builtins
import operator
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from lightning_relief.errors import ReliefError
from lightning_relief.moments import functional as MF
from lightning_relief.moments import low_rank as LR


@dataclass(frozen=True)
class Step:
    """One layer on the path of shared noise sources (``covariance="low_rank"``; see :mod:`~lightning_relief.moments.low_rank`).

    The adjoint sweep calls ``fn(G, *args)``: a layer's transposed map (the new ``G``), or, for a
    ``source``, the logits' factor of the sources it adds (``G`` unchanged).
    """

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    source: bool = False


@dataclass(frozen=True)
class Tape:
    """The steps from the first shared source to a value, and ``share``: the per-unit variance those
    sources give it when propagated as independent (what the per-unit rules count)."""

    steps: tuple[Step, ...]
    share: fx.Node

    def then(self, step: Step, share: fx.Node) -> Tape:
        return Tape((*self.steps, step), share)


@dataclass(frozen=True)
class Moments:
    """A random value in the graph being built: its mean and variance nodes.

    ``before_softmax`` marks the moments of logits whose (log-)softmax was taken at
    the output: they may only be returned, never computed with.

    ``cov``, when known, emits ``Cov(x_p, x_{p + offset})`` of same-channel neighbours
    (set by convolutions, carried through batch norm and dropout); ``pre`` is
    ``(input, reapply)`` of a monotone elementwise function, so that a max pool can
    take the max of its correlated Gaussian input and apply the function after
    (``max(f(a), f(b)) = f(max(a, b))``).
    """

    mean: fx.Node
    var: fx.Node
    before_softmax: str | None = None
    cov: Callable[[tuple[int, ...]], fx.Node] | None = field(default=None, compare=False)
    pre: tuple[Moments, Callable[[Moments], Any]] | None = field(default=None, compare=False)
    tape: Tape | None = field(default=None, compare=False)  # covariance="low_rank"


class UnsupportedOperationError(ReliefError, NotImplementedError):
    """An operation that moment propagation has no rule for (the message names it and where it is).

    ``module_path`` is the dotted name of the module it sits in (``""`` for the root) and
    ``layer_type`` the module class or the function's name, when known.
    """

    def __init__(self, message: str, module_path: str | None = None, layer_type: str | None = None) -> None:
        super().__init__(message)
        self.module_path = module_path
        self.layer_type = layer_type


class RuleContext:
    """What a handler may do: emit nodes into the new graph and reach the model's modules."""

    def __init__(
        self, graph: fx.Graph, model: nn.Module, module_prefix: str, low_rank: bool = False,
        last_layer: bool = False,
    ) -> None:  # fmt: skip
        self.graph = graph
        self.model = model
        self._prefix = module_prefix
        self.low_rank = low_rank
        # sources only at a linear layer's input, one per unit: the logits' correlation when the network
        # ends in one (what the per-unit modes imply for the classes)
        self.last_layer = last_layer

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_function(fn, tuple(args), kwargs)

    def method(self, name: str, *args: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_method(name, tuple(args), kwargs)

    def pair(self, node: fx.Node) -> Moments:
        """Split a node that returns ``(mean, var)``."""
        return Moments(self.call(operator.getitem, node, 0), self.call(operator.getitem, node, 1))

    def rule(self, fn: Callable[..., tuple[Tensor, Tensor]], *args: Any, **kwargs: Any) -> Moments:
        return self.pair(self.call(fn, *args, **kwargs))

    def attr(self, path: str) -> fx.Node:
        """A ``get_attr`` node for a module or tensor of the model, looked up at call time."""
        return self.graph.get_attr(f"{self._prefix}{path}")

    def moments(self, value: Any) -> Moments:
        """``value`` as moments; a plain tensor gets zero variance."""
        if isinstance(value, Moments):
            return value
        if isinstance(value, (int, float)):
            raise TypeError("a Python number cannot be turned into moments")
        return Moments(value, self.call(torch.zeros_like, value))


Handler = Callable[..., Any]  # (ctx, node, module_or_None, args, kwargs) -> value


def _arg(args: Sequence[Any], kwargs: dict[str, Any], index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _input(ctx: RuleContext, args: Sequence[Any], kwargs: dict[str, Any], name: str = "input") -> Moments:
    return ctx.moments(_arg(args, kwargs, 0, name))


def _require_plain(value: Any, what: str) -> None:
    if isinstance(value, Moments) or (isinstance(value, (tuple, list)) and any(isinstance(v, Moments) for v in value)):
        raise UnsupportedOperationError(f"{what} must not be random")


# ---- dropout -----------------------------------------------------------------------------------


def _dropout(ctx: RuleContext, x: Any, p: float) -> Moments:
    if isinstance(x, Moments):
        return ctx.rule(MF.dropout_moments, x.mean, x.var, float(p))
    return ctx.rule(MF.dropout_moments, x, None, float(p))


def _keep_cov(x: Any, out: Moments) -> Moments:
    # independent masks with mean 1 leave the covariance of two different units unchanged
    return replace(out, cov=x.cov) if isinstance(x, Moments) and x.cov is not None else out


def _dropout_module(ctx, node, module, args, kwargs):
    # Dropout1d/2d/3d drop whole channels: the per-unit moments are the same, their correlation is ignored
    out = _dropout(ctx, args[0], module.p)
    return _keep_cov(args[0], out) if type(module) is nn.Dropout else out


def _dropout_function(ctx, node, module, args, kwargs):
    # the traced ``training`` flag is ignored on purpose: MC dropout samples at test time
    x = _arg(args, kwargs, 0, "input")
    out = _dropout(ctx, x, _arg(args, kwargs, 1, "p", 0.5))
    return _keep_cov(x, out) if node.target is F.dropout else out


def _torch_dropout(ctx, node, module, args, kwargs):
    return _dropout(ctx, args[0], _arg(args, kwargs, 1, "p"))


# ---- layers linear in their input -------------------------------------------------------------


def _conv_input(ctx: RuleContext, module: nn.Module, x: Moments) -> tuple[Moments, Any]:
    """Apply a non-zero ``padding_mode`` explicitly; returns the input and the conv padding to use."""
    if getattr(module, "padding_mode", "zeros") == "zeros":
        return x, module.padding
    pad = list(module._reversed_padding_repeated_twice)
    mean = ctx.call(F.pad, x.mean, pad, mode=module.padding_mode)
    var = ctx.call(F.pad, x.var, pad, mode=module.padding_mode)
    return Moments(mean, var), 0


def _name(target: Any) -> str:
    return getattr(target, "__name__", str(target))


def _linear_module(ctx, node, module, args, kwargs):
    x = ctx.moments(args[0])
    bias = ctx.attr(f"{node.target}.bias") if module.bias is not None else None
    return ctx.rule(MF.linear_moments, x.mean, x.var, ctx.attr(f"{node.target}.weight"), bias)


def _conv_module(ctx, node, module, args, kwargs):
    random = isinstance(args[0], Moments)
    x, padding = _conv_input(ctx, module, ctx.moments(args[0]))
    bias = ctx.attr(f"{node.target}.bias") if module.bias is not None else None
    weight = ctx.attr(f"{node.target}.weight")
    out = ctx.rule(MF.conv_moments, x.mean, x.var, weight, bias, module.stride, padding, module.dilation, module.groups)
    if not random:
        return out
    conv = (module.stride, padding, module.dilation, module.groups)
    return replace(out, cov=_conv_cov(ctx, x.mean, x.var, weight, None, None, conv))


def _conv_cov(
    ctx: RuleContext, mean: Any, var: Any, weight_mean: Any, weight_var: Any, bias_var: Any, conv: tuple
) -> Callable:  # fmt: skip
    """Emits the neighbour covariance of a convolution's output on demand (only a max pool asks)."""

    def emit(offset: tuple[int, ...]) -> fx.Node:
        return ctx.call(MF.conv_neighbour_cov, mean, var, weight_mean, weight_var, bias_var, *conv, offset)

    return emit


def _weight_function(rule: Callable[..., tuple[Tensor, Tensor]]) -> Handler:
    def handler(ctx, node, module, args, kwargs):
        x = _input(ctx, args, kwargs)
        weight, bias = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        _require_plain(weight, f"the weight of {_name(node.target)}")
        _require_plain(bias, f"the bias of {_name(node.target)}")
        rest = {k: v for k, v in kwargs.items() if k not in ("input", "weight", "bias")}
        return ctx.rule(rule, x.mean, x.var, weight, bias, *args[3:], **rest)

    return handler


def _batch_norm_module(ctx, node, module, args, kwargs):
    if module.running_mean is None or module.running_var is None:
        raise UnsupportedOperationError(
            f"{type(module).__name__} without running statistics (track_running_stats=False) normalises "
            "by batch statistics, which has no per-unit rule"
        )
    x = ctx.moments(args[0])
    attr = lambda name: ctx.attr(f"{node.target}.{name}") if getattr(module, name) is not None else None
    out = ctx.rule(
        MF.batch_norm_moments, x.mean, x.var, attr("running_mean"), attr("running_var"), attr("weight"), attr("bias"), module.eps
    )
    return _scaled_cov(ctx, x, out, attr("running_var"), attr("weight"), module.eps)


def _scaled_cov(ctx: RuleContext, x: Moments, out: Moments, running_var: Any, weight: Any, eps: float) -> Moments:
    # a per-channel affine map scales same-channel covariances by the squared scale
    if x.cov is None:
        return out

    def emit(offset: tuple[int, ...]) -> fx.Node:
        scale = ctx.call(MF.batch_norm_scale_squared, running_var, weight, eps, ctx.method("dim", x.mean))
        return ctx.call(operator.mul, x.cov(offset), scale)

    return replace(out, cov=emit)


def _batch_norm_function(ctx, node, module, args, kwargs):
    x = _input(ctx, args, kwargs)
    running_mean, running_var = _arg(args, kwargs, 1, "running_mean"), _arg(args, kwargs, 2, "running_var")
    if running_mean is None or running_var is None:
        raise UnsupportedOperationError("F.batch_norm without running statistics has no per-unit rule")
    weight, bias = _arg(args, kwargs, 3, "weight"), _arg(args, kwargs, 4, "bias")
    eps = _arg(args, kwargs, 7, "eps", 1e-5)
    out = ctx.rule(MF.batch_norm_moments, x.mean, x.var, running_mean, running_var, weight, bias, eps)
    return _scaled_cov(ctx, x, out, running_var, weight, eps)


# ---- Gaussian-weight layers (bayesian-torch) --------------------------------------------------


def _softplus_square(rho: Tensor) -> Tensor:
    # bayesian-torch: sigma = log1p(exp(rho))
    sigma = torch.log1p(torch.exp(rho))
    return sigma * sigma


def _bayesian_layer(ctx, node, module, args, kwargs):
    # a deterministic input (the first layer) has no variance term: None rather than zeros spares a convolution
    mean, var = (args[0].mean, args[0].var) if isinstance(args[0], Moments) else (args[0], None)
    path = node.target
    weight_name = "mu_weight" if hasattr(module, "mu_weight") else "mu_kernel"
    weight_mean = ctx.attr(f"{path}.{weight_name}")
    weight_var = ctx.call(_softplus_square, ctx.attr(f"{path}.{weight_name.replace('mu_', 'rho_')}"))
    has_bias = getattr(module, "mu_bias", None) is not None
    bias_mean = ctx.attr(f"{path}.mu_bias") if has_bias else None
    bias_var = ctx.call(_softplus_square, ctx.attr(f"{path}.rho_bias")) if has_bias else None
    if hasattr(module, "mu_weight"):
        out = ctx.rule(MF.gaussian_linear_moments, mean, var, weight_mean, weight_var, bias_mean, bias_var)
    else:
        conv = (module.stride, module.padding, module.dilation, module.groups)
        out = ctx.rule(MF.gaussian_conv_moments, mean, var, weight_mean, weight_var, bias_mean, bias_var, *conv)
        # one weight draw serves every position: neighbours are strongly correlated
        out = replace(out, cov=_conv_cov(ctx, mean, var, weight_mean, weight_var, bias_var, conv))
    returns_kl = _arg(args, kwargs, 1, "return_kl", True) and not getattr(module, "dnn_to_bnn_flag", False)
    if returns_kl:
        # the layer returns (out, kl); the KL is deterministic and is usually dropped from the graph
        return (out, ctx.method("kl_loss", ctx.attr(path)))
    return out


# ---- activations ------------------------------------------------------------------------------


def _unary(rule: Callable[..., tuple[Tensor, Tensor]]) -> Handler:
    def handler(ctx, node, module, args, kwargs):
        x = _input(ctx, args, kwargs)
        return ctx.rule(rule, x.mean, x.var)

    return handler


def _leaky_relu_module(ctx, node, module, args, kwargs):
    x = ctx.moments(args[0])
    return ctx.rule(MF.leaky_relu_moments, x.mean, x.var, float(module.negative_slope))


def _leaky_relu_function(ctx, node, module, args, kwargs):
    x = _input(ctx, args, kwargs)
    return ctx.rule(MF.leaky_relu_moments, x.mean, x.var, float(_arg(args, kwargs, 1, "negative_slope", 0.01)))


def _identity(ctx, node, module, args, kwargs):
    return args[0]


# ---- pooling ----------------------------------------------------------------------------------


def _max_pool_module(dims: int) -> Handler:
    def handler(ctx, node, module, args, kwargs):
        if module.return_indices:
            raise UnsupportedOperationError(f"{type(module).__name__} with return_indices")
        options = {"dims": dims, "ceil_mode": module.ceil_mode}
        return _max_pool(ctx, args[0], (module.kernel_size, module.stride, module.padding, module.dilation), options)

    return handler


def _max_pool(ctx: RuleContext, x: Any, window: tuple, options: dict[str, Any]) -> Moments:
    """Max pooling; with the neighbour covariance of a convolution before it, Clark's correlated form.

    A monotone activation between the convolution and the pool commutes with the max:
    the max is taken over its Gaussian input and the activation applied after.
    """
    x = ctx.moments(x)
    base, after = (x.pre[0], x.pre[1]) if x.pre is not None and (x.pre[0].cov is not None or x.pre[0].tape) else (x, None)
    dims = options["dims"]
    if base.tape is not None and not options["ceil_mode"] and not any(MF._tuple(window[2], dims)):
        kernel, stride, _, dilation = (MF._tuple(v, dims) if v is not None and v != [] else None for v in window)
        stride = stride if stride is not None else kernel
        covariances = {o: base.cov(o) for o in MF.pool_offsets(kernel, dilation, dims)} if base.cov is not None else None
        out = ctx.call(MF.max_pool_wins, base.mean, base.var, kernel, stride, dilation, dims, covariances)
        wins = ctx.call(operator.getitem, out, 2)
        share = ctx.call(LR.pool_share, base.tape.share, wins, kernel, stride, dilation, base.var, covariances)
        tape = base.tape.then(Step(LR.pool_back, (wins, base.mean, kernel, stride, dilation)), share)
        pooled = Moments(ctx.call(operator.getitem, out, 0), ctx.call(operator.getitem, out, 1), tape=tape)
        return after(pooled) if after is not None else pooled
    if base.cov is None:
        return ctx.rule(MF.max_pool_moments, x.mean, x.var, *window, **options)
    offsets = MF.pool_offsets(window[0], window[3], options["dims"])
    covariances = {offset: base.cov(offset) for offset in offsets}
    pooled = ctx.rule(MF.max_pool_moments, base.mean, base.var, *window, **options, covariances=covariances)
    return after(pooled) if after is not None else pooled


def _max_pool_function(dims: int) -> Handler:
    def handler(ctx, node, module, args, kwargs):
        x = _input(ctx, args, kwargs)
        names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
        bound = {name: _arg(args, kwargs, i, name) for i, name in enumerate(names)}
        if bound["return_indices"]:
            raise UnsupportedOperationError(f"max_pool{dims}d with return_indices")
        window = (bound["kernel_size"], bound["stride"], bound["padding"] or 0, bound["dilation"] or 1)
        return _max_pool(ctx, x, window, {"dims": dims, "ceil_mode": bool(bound["ceil_mode"])})

    return handler


def _avg_pool_module(dims: int) -> Handler:
    def handler(ctx, node, module, args, kwargs):
        x = ctx.moments(args[0])
        return ctx.rule(
            MF.avg_pool_moments, x.mean, x.var, module.kernel_size, module.stride, module.padding, module.ceil_mode,
            module.count_include_pad, getattr(module, "divisor_override", None), dims=dims,
        )  # fmt: skip

    return handler


def _avg_pool_function(dims: int) -> Handler:
    def handler(ctx, node, module, args, kwargs):
        x = _input(ctx, args, kwargs)
        names = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
        defaults = (None, None, None, 0, False, True, None)
        bound = {name: _arg(args, kwargs, i, name, d) for i, (name, d) in enumerate(zip(names, defaults))}
        del bound["input"]
        return ctx.rule(MF.avg_pool_moments, x.mean, x.var, dims=dims, **bound)

    return handler


def _adaptive_avg_pool_module(dims: int) -> Handler:
    def handler(ctx, node, module, args, kwargs):
        x = ctx.moments(args[0])
        return ctx.rule(MF.adaptive_avg_pool_moments, x.mean, x.var, module.output_size, dims=dims)

    return handler


def _adaptive_avg_pool_function(dims: int) -> Handler:
    def handler(ctx, node, module, args, kwargs):
        x = _input(ctx, args, kwargs)
        return ctx.rule(MF.adaptive_avg_pool_moments, x.mean, x.var, _arg(args, kwargs, 1, "output_size"), dims=dims)

    return handler


# ---- shape operations: the same op on mean and variance ---------------------------------------


def _both_function(fn: Callable[..., Any]) -> Handler:
    def handler(ctx, node, module, args, kwargs):
        x = ctx.moments(args[0])
        _require_plain(list(args[1:]) + list(kwargs.values()), f"the arguments of {getattr(fn, '__name__', fn)}")
        return Moments(ctx.call(fn, x.mean, *args[1:], **kwargs), ctx.call(fn, x.var, *args[1:], **kwargs))

    return handler


def _both_method(ctx, node, module, args, kwargs):
    x = ctx.moments(args[0])
    _require_plain(list(args[1:]) + list(kwargs.values()), f"the arguments of .{node.target}()")
    return Moments(ctx.method(node.target, x.mean, *args[1:], **kwargs), ctx.method(node.target, x.var, *args[1:], **kwargs))


def _both_module(ctx, node, module, args, kwargs):
    # Flatten / Unflatten: stateless shape modules, called on both
    x = ctx.moments(args[0])
    target = ctx.attr(node.target)
    return Moments(ctx.graph.call_function(_call, (target, x.mean)), ctx.graph.call_function(_call, (target, x.var)))


def _call(module: nn.Module, x: Tensor) -> Tensor:
    return module(x)


def _of_mean_function(ctx, node, module, args, kwargs):
    # shape queries (x.shape, x.size(), x.dim()) are deterministic: ask the mean
    return ctx.call(node.target, args[0].mean, *args[1:], **kwargs)


def _of_mean_method(ctx, node, module, args, kwargs):
    return ctx.method(node.target, args[0].mean, *args[1:], **kwargs)


def _getitem(ctx, node, module, args, kwargs):
    container, index = args
    if isinstance(container, (tuple, list)):  # a layer's (out, kl) tuple, resolved while building
        return container[index]
    _require_plain(index, "a tensor index")
    return Moments(ctx.call(operator.getitem, container.mean, index), ctx.call(operator.getitem, container.var, index))


def _concatenate(fn: Callable[..., Tensor]) -> Handler:
    def handler(ctx, node, module, args, kwargs):
        parts = [ctx.moments(v) for v in _arg(args, kwargs, 0, "tensors")]
        rest = {k: v for k, v in kwargs.items() if k != "tensors"}
        means = ctx.call(fn, [p.mean for p in parts], *args[1:], **rest)
        return Moments(means, ctx.call(fn, [p.var for p in parts], *args[1:], **rest))

    return handler


# ---- arithmetic -------------------------------------------------------------------------------


def _add(sign: float) -> Handler:
    def handler(ctx, node, module, args, kwargs):
        a, b = args[0], args[1]
        if kwargs.get("alpha", 1) != 1:
            raise UnsupportedOperationError("add/sub with alpha != 1")
        op = operator.add if sign > 0 else operator.sub
        if isinstance(a, Moments) and isinstance(b, Moments):
            # independence assumed: the variances add (a residual branch is in truth correlated with its input)
            return Moments(ctx.call(op, a.mean, b.mean), ctx.call(operator.add, a.var, b.var))
        if isinstance(a, Moments):
            return Moments(ctx.call(op, a.mean, b), a.var)
        return Moments(ctx.call(op, a, b.mean), b.var)

    return handler


def _mul(ctx, node, module, args, kwargs):
    a, b = args[0], args[1]
    if isinstance(a, Moments) and isinstance(b, Moments):
        return ctx.rule(MF.product_moments, a.mean, a.var, b.mean, b.var)
    x, c = (a, b) if isinstance(a, Moments) else (b, a)
    return Moments(ctx.call(operator.mul, x.mean, c), ctx.call(operator.mul, x.var, ctx.call(operator.mul, c, c)))


def _div(ctx, node, module, args, kwargs):
    a, b = args[0], args[1]
    if isinstance(b, Moments):
        raise UnsupportedOperationError("division by a random value")
    return Moments(ctx.call(operator.truediv, a.mean, b), ctx.call(operator.truediv, a.var, ctx.call(operator.mul, b, b)))


def _neg(ctx, node, module, args, kwargs):
    return Moments(ctx.call(operator.neg, args[0].mean), args[0].var)


def _mean(ctx, node, module, args, kwargs):
    x = ctx.moments(args[0])
    dim, keepdim = _arg(args, kwargs, 1, "dim"), _arg(args, kwargs, 2, "keepdim", False)
    if kwargs.get("dtype") is not None:
        raise UnsupportedOperationError("mean with dtype")
    return ctx.rule(MF.mean_moments, x.mean, x.var, dim, keepdim)


def _sum(ctx, node, module, args, kwargs):
    x = ctx.moments(args[0])
    dim, keepdim = _arg(args, kwargs, 1, "dim"), _arg(args, kwargs, 2, "keepdim", False)
    if dim is None:
        return Moments(ctx.call(torch.sum, x.mean), ctx.call(torch.sum, x.var))
    return Moments(ctx.call(torch.sum, x.mean, dim, keepdim), ctx.call(torch.sum, x.var, dim, keepdim))


# ---- round 2: activations by quadrature or exact clipping, normalisation, upsampling, attention -


def _activation_function(name: str, *params: str) -> Handler:
    """Gauss-Hermite moments of ``F.<name>(input, *params)``, e.g. ``F.elu(x, alpha)``."""

    def handler(ctx, node, module, args, kwargs):
        x = _input(ctx, args, kwargs)
        values = {p: _arg(args, kwargs, i + 1, p) for i, p in enumerate(params)}
        values = {p: v for p, v in values.items() if v is not None}
        _require_plain(list(values.values()), f"the arguments of {name}")
        return ctx.rule(MF.activation_moments, x.mean, x.var, name, **values)

    return handler


def _module_quadrature(ctx, node, module, args, kwargs):
    # the module itself is the elementwise function (GELU(approximate=...), Softplus(beta), ELU(alpha), ...)
    x = ctx.moments(args[0])
    return ctx.rule(MF.elementwise_moments, ctx.attr(node.target), x.mean, x.var)


def _clamp_module(ctx, node, module, args, kwargs):
    x = ctx.moments(args[0])
    return ctx.rule(MF.clamp_moments, x.mean, x.var, float(module.min_val), float(module.max_val))


def _hardtanh_function(low: float | None = None, high: float | None = None) -> Handler:
    def handler(ctx, node, module, args, kwargs):
        x = _input(ctx, args, kwargs)
        lo = low if low is not None else float(_arg(args, kwargs, 1, "min_val", -1.0))
        hi = high if high is not None else float(_arg(args, kwargs, 2, "max_val", 1.0))
        return ctx.rule(MF.clamp_moments, x.mean, x.var, lo, hi)

    return handler


def _clamp_function(ctx, node, module, args, kwargs):
    x = _input(ctx, args, kwargs)
    low, high = _arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max")
    _require_plain([low, high], "the bounds of clamp")
    if not all(b is None or isinstance(b, (int, float)) for b in (low, high)):
        raise UnsupportedOperationError("clamp with tensor bounds")
    return ctx.rule(MF.clamp_moments, x.mean, x.var, None if low is None else float(low), None if high is None else float(high))


def _hardsigmoid(ctx, node, module, args, kwargs):
    # hardsigmoid(x) = clamp(x / 6 + 1/2, 0, 1): an affine map, then an exact clamp
    x = _input(ctx, args, kwargs)
    mean = ctx.call(operator.add, ctx.call(operator.truediv, x.mean, 6.0), 0.5)
    return ctx.rule(MF.clamp_moments, mean, ctx.call(operator.truediv, x.var, 36.0), 0.0, 1.0)


def _prelu_module(ctx, node, module, args, kwargs):
    x = ctx.moments(args[0])
    return ctx.rule(MF.prelu_moments, x.mean, x.var, ctx.attr(f"{node.target}.weight"))


def _prelu_function(ctx, node, module, args, kwargs):
    x = _input(ctx, args, kwargs)
    weight = _arg(args, kwargs, 1, "weight")
    _require_plain(weight, "the weight of prelu")
    return ctx.rule(MF.prelu_moments, x.mean, x.var, weight)


def _alpha_dropout(ctx: RuleContext, x: Any, p: float) -> Moments:
    if isinstance(x, Moments):
        return ctx.rule(MF.alpha_dropout_moments, x.mean, x.var, float(p))
    return ctx.rule(MF.alpha_dropout_moments, x, None, float(p))


def _alpha_dropout_module(ctx, node, module, args, kwargs):
    # FeatureAlphaDropout drops whole channels: the per-unit moments are the same
    return _alpha_dropout(ctx, args[0], module.p)


def _alpha_dropout_function(ctx, node, module, args, kwargs):
    return _alpha_dropout(ctx, _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "p", 0.5))


def _softmax_at_output(kind: str) -> Handler:
    def handler(ctx, node, module, args, kwargs):
        x = ctx.moments(args[0])
        dim = module.dim if module is not None else _arg(args, kwargs, 1, "dim")
        if dim not in (-1, 1):
            raise UnsupportedOperationError(f"{kind} over dim {dim} (only the class dim, -1 or 1, at the output)")
        return Moments(x.mean, x.var, before_softmax=kind, tape=x.tape)

    return handler


def _layer_norm_module(ctx, node, module, args, kwargs):
    x = ctx.moments(args[0])
    attr = lambda name: ctx.attr(f"{node.target}.{name}") if getattr(module, name, None) is not None else None
    return ctx.rule(
        MF.layer_norm_moments, x.mean, x.var, tuple(module.normalized_shape), attr("weight"), attr("bias"), module.eps
    )


def _layer_norm_function(ctx, node, module, args, kwargs):
    x = _input(ctx, args, kwargs)
    shape, weight = _arg(args, kwargs, 1, "normalized_shape"), _arg(args, kwargs, 2, "weight")
    bias, eps = _arg(args, kwargs, 3, "bias"), _arg(args, kwargs, 4, "eps", 1e-5)
    _require_plain([weight, bias], "the affine parameters of layer_norm")
    return ctx.rule(MF.layer_norm_moments, x.mean, x.var, tuple(shape), weight, bias, eps)


def _group_norm_module(ctx, node, module, args, kwargs):
    x = ctx.moments(args[0])
    attr = lambda name: ctx.attr(f"{node.target}.{name}") if getattr(module, name, None) is not None else None
    return ctx.rule(MF.group_norm_moments, x.mean, x.var, module.num_groups, attr("weight"), attr("bias"), module.eps)


def _group_norm_function(ctx, node, module, args, kwargs):
    x = _input(ctx, args, kwargs)
    groups, weight = _arg(args, kwargs, 1, "num_groups"), _arg(args, kwargs, 2, "weight")
    bias, eps = _arg(args, kwargs, 3, "bias"), _arg(args, kwargs, 4, "eps", 1e-5)
    _require_plain([weight, bias], "the affine parameters of group_norm")
    return ctx.rule(MF.group_norm_moments, x.mean, x.var, groups, weight, bias, eps)


def _conv_transpose_module(ctx, node, module, args, kwargs):
    if len(args) > 1 or kwargs.get("output_size") is not None:
        raise UnsupportedOperationError(f"{type(module).__name__} called with output_size")
    x = ctx.moments(args[0])
    bias = ctx.attr(f"{node.target}.bias") if module.bias is not None else None
    return ctx.rule(
        MF.conv_transpose_moments, x.mean, x.var, ctx.attr(f"{node.target}.weight"), bias, module.stride,
        module.padding, module.output_padding, module.groups, module.dilation,
    )  # fmt: skip


def _conv_transpose_function(ctx, node, module, args, kwargs):
    x = _input(ctx, args, kwargs)
    names = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
    defaults = (None, None, None, 1, 0, 0, 1, 1)
    bound = {name: _arg(args, kwargs, i, name, d) for i, (name, d) in enumerate(zip(names, defaults))}
    _require_plain([bound["weight"], bound["bias"]], f"the weight of {_name(node.target)}")
    del bound["input"]
    return ctx.rule(MF.conv_transpose_moments, x.mean, x.var, **bound)


_NEAREST = ("nearest", "nearest-exact")


def _upsample_module(ctx, node, module, args, kwargs):
    if module.mode not in _NEAREST:
        raise UnsupportedOperationError(f"{type(module).__name__} with mode={module.mode!r} (supported: {_NEAREST})")
    return _both_module(ctx, node, module, args, kwargs)


def _interpolate(ctx, node, module, args, kwargs):
    mode = _arg(args, kwargs, 3, "mode", "nearest")
    if mode not in _NEAREST:
        raise UnsupportedOperationError(f"interpolate with mode={mode!r} (supported: {_NEAREST})")
    # nearest-neighbour copies units: the same op on mean and variance is exact
    return _both_function(node.target)(ctx, node, module, args, kwargs)


def _adaptive_max_pool_module(dims: int) -> Handler:
    def handler(ctx, node, module, args, kwargs):
        if module.return_indices:
            raise UnsupportedOperationError(f"{type(module).__name__} with return_indices")
        x = ctx.moments(args[0])
        return ctx.rule(MF.adaptive_max_pool_moments, x.mean, x.var, module.output_size, dims=dims)

    return handler


def _adaptive_max_pool_function(dims: int) -> Handler:
    def handler(ctx, node, module, args, kwargs):
        if _arg(args, kwargs, 2, "return_indices", False):
            raise UnsupportedOperationError(f"adaptive_max_pool{dims}d with return_indices")
        x = _input(ctx, args, kwargs)
        return ctx.rule(MF.adaptive_max_pool_moments, x.mean, x.var, _arg(args, kwargs, 1, "output_size"), dims=dims)

    return handler


def _amax(ctx, node, module, args, kwargs):
    x = ctx.moments(args[0])
    dim, keepdim = _arg(args, kwargs, 1, "dim"), _arg(args, kwargs, 2, "keepdim", False)
    if isinstance(dim, (tuple, list)):
        if len(dim) != 1:
            raise UnsupportedOperationError("amax over more than one dim")
        dim = dim[0]
    if not isinstance(dim, int):
        raise UnsupportedOperationError("amax/max without a single integer dim")
    return ctx.rule(MF.max_reduce_moments, x.mean, x.var, dim, keepdim)


def _attention_module(ctx, node, module, args, kwargs):
    # no closed form for softmax(q k^T) v: sample, but only this block, from fixed draws
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")
    bound = {name: _arg(args, kwargs, i, name) for i, name in enumerate(names)}
    q, k, v = (bound.pop(n) for n in ("query", "key", "value"))
    _require_plain([bound["key_padding_mask"], bound["attn_mask"]], "the attention masks")
    need_weights = bound.pop("need_weights")
    need_weights = True if need_weights is None else bool(need_weights)
    options = {key: value for key, value in bound.items() if value is not None}
    distinct: list[Any] = []
    for value in (q, k, v):
        if not any(value is seen for seen in distinct):
            distinct.append(value)
    layout = tuple(next(i for i, seen in enumerate(distinct) if seen is value) for value in (q, k, v))
    pairs = [ctx.moments(value) for value in distinct]
    warnings.warn(
        f"moment propagation samples the attention block '{node.target}' ({type(module).__name__}) with "
        f"{MF.BLOCK_SAMPLES} fixed draws of its inputs; the rest of the network is analytic",
        stacklevel=2,
    )
    out = ctx.call(
        MF.sampled_attention_moments, ctx.attr(node.target), [p.mean for p in pairs], [p.var for p in pairs], layout,
        need_weights, options,
    )  # fmt: skip
    result = Moments(ctx.call(operator.getitem, out, 0), ctx.call(operator.getitem, out, 1))
    weights = Moments(ctx.call(operator.getitem, out, 2), ctx.call(operator.getitem, out, 3)) if need_weights else None
    return (result, weights)


# ---- registries -------------------------------------------------------------------------------

_SHAPE_FUNCTIONS = (
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
    torch.movedim, torch.narrow, torch.clone,
)  # fmt: skip
_SHAPE_METHODS = (
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "squeeze", "unsqueeze", "contiguous",
    "movedim", "narrow", "clone", "expand", "expand_as", "view_as", "reshape_as",
)  # fmt: skip

MODULE_RULES: dict[type, Handler] = {
    nn.Dropout: _dropout_module,
    nn.Dropout1d: _dropout_module,
    nn.Dropout2d: _dropout_module,
    nn.Dropout3d: _dropout_module,
    nn.Linear: _linear_module,
    nn.Conv1d: _conv_module,
    nn.Conv2d: _conv_module,
    nn.Conv3d: _conv_module,
    nn.BatchNorm1d: _batch_norm_module,
    nn.BatchNorm2d: _batch_norm_module,
    nn.BatchNorm3d: _batch_norm_module,
    nn.ReLU: _unary(MF.relu_moments),
    nn.LeakyReLU: _leaky_relu_module,
    nn.Sigmoid: _unary(MF.sigmoid_moments),
    nn.Tanh: _unary(MF.tanh_moments),
    nn.Identity: _identity,
    nn.MaxPool1d: _max_pool_module(1),
    nn.MaxPool2d: _max_pool_module(2),
    nn.AvgPool1d: _avg_pool_module(1),
    nn.AvgPool2d: _avg_pool_module(2),
    nn.AdaptiveAvgPool1d: _adaptive_avg_pool_module(1),
    nn.AdaptiveAvgPool2d: _adaptive_avg_pool_module(2),
    nn.Flatten: _both_module,
    nn.Unflatten: _both_module,
    nn.AlphaDropout: _alpha_dropout_module,
    nn.FeatureAlphaDropout: _alpha_dropout_module,
    nn.GELU: _module_quadrature,
    nn.SiLU: _module_quadrature,
    nn.Mish: _module_quadrature,
    nn.Softplus: _module_quadrature,
    nn.ELU: _module_quadrature,
    nn.CELU: _module_quadrature,
    nn.SELU: _module_quadrature,
    nn.Hardswish: _module_quadrature,
    nn.Softsign: _module_quadrature,
    nn.LogSigmoid: _module_quadrature,
    nn.Tanhshrink: _module_quadrature,
    nn.Hardtanh: _clamp_module,  # also ReLU6, a Hardtanh(0, 6)
    nn.Hardsigmoid: _hardsigmoid,
    nn.PReLU: _prelu_module,
    nn.Softmax: _softmax_at_output("softmax"),
    nn.LogSoftmax: _softmax_at_output("log_softmax"),
    nn.LayerNorm: _layer_norm_module,
    nn.GroupNorm: _group_norm_module,
    nn.ConvTranspose1d: _conv_transpose_module,
    nn.ConvTranspose2d: _conv_transpose_module,
    nn.ConvTranspose3d: _conv_transpose_module,
    nn.Upsample: _upsample_module,
    nn.AdaptiveMaxPool1d: _adaptive_max_pool_module(1),
    nn.AdaptiveMaxPool2d: _adaptive_max_pool_module(2),
    nn.MultiheadAttention: _attention_module,
}

FUNCTION_RULES: dict[Any, Handler] = {
    F.dropout: _dropout_function,
    F.dropout1d: _dropout_function,
    F.dropout2d: _dropout_function,
    F.dropout3d: _dropout_function,
    torch.dropout: _torch_dropout,
    F.linear: _weight_function(MF.linear_moments),
    F.conv1d: _weight_function(MF.conv_moments),
    F.conv2d: _weight_function(MF.conv_moments),
    F.conv3d: _weight_function(MF.conv_moments),
    F.batch_norm: _batch_norm_function,
    F.relu: _unary(MF.relu_moments),
    torch.relu: _unary(MF.relu_moments),
    F.leaky_relu: _leaky_relu_function,
    torch.sigmoid: _unary(MF.sigmoid_moments),
    F.sigmoid: _unary(MF.sigmoid_moments),
    torch.tanh: _unary(MF.tanh_moments),
    F.tanh: _unary(MF.tanh_moments),
    F.max_pool1d: _max_pool_function(1),
    F.max_pool2d: _max_pool_function(2),
    F.avg_pool1d: _avg_pool_function(1),
    F.avg_pool2d: _avg_pool_function(2),
    F.adaptive_avg_pool1d: _adaptive_avg_pool_function(1),
    F.adaptive_avg_pool2d: _adaptive_avg_pool_function(2),
    F.alpha_dropout: _alpha_dropout_function,
    F.feature_alpha_dropout: _alpha_dropout_function,
    F.gelu: _activation_function("gelu", "approximate"),
    F.silu: _activation_function("silu"),
    F.mish: _activation_function("mish"),
    F.softplus: _activation_function("softplus", "beta", "threshold"),
    F.elu: _activation_function("elu", "alpha"),
    F.celu: _activation_function("celu", "alpha"),
    F.selu: _activation_function("selu"),
    torch.selu: _activation_function("selu"),
    F.hardswish: _activation_function("hardswish"),
    F.softsign: _activation_function("softsign"),
    F.logsigmoid: _activation_function("logsigmoid"),
    F.tanhshrink: _activation_function("tanhshrink"),
    F.hardtanh: _hardtanh_function(),
    F.relu6: _hardtanh_function(0.0, 6.0),
    torch.clamp: _clamp_function,
    torch.clip: _clamp_function,
    F.hardsigmoid: _hardsigmoid,
    F.prelu: _prelu_function,
    torch.prelu: _prelu_function,
    F.softmax: _softmax_at_output("softmax"),
    torch.softmax: _softmax_at_output("softmax"),
    F.log_softmax: _softmax_at_output("log_softmax"),
    torch.log_softmax: _softmax_at_output("log_softmax"),
    F.layer_norm: _layer_norm_function,
    F.group_norm: _group_norm_function,
    F.conv_transpose1d: _conv_transpose_function,
    F.conv_transpose2d: _conv_transpose_function,
    F.conv_transpose3d: _conv_transpose_function,
    F.interpolate: _interpolate,
    F.adaptive_max_pool1d: _adaptive_max_pool_function(1),
    F.adaptive_max_pool2d: _adaptive_max_pool_function(2),
    torch.amax: _amax,
    torch.cat: _concatenate(torch.cat),
    torch.stack: _concatenate(torch.stack),
    operator.getitem: _getitem,
    operator.add: _add(1.0),
    operator.iadd: _add(1.0),
    torch.add: _add(1.0),
    operator.sub: _add(-1.0),
    operator.isub: _add(-1.0),
    torch.sub: _add(-1.0),
    operator.mul: _mul,
    operator.imul: _mul,
    torch.mul: _mul,
    operator.truediv: _div,
    torch.div: _div,
    operator.neg: _neg,
    torch.neg: _neg,
    torch.mean: _mean,
    torch.sum: _sum,
    builtins.getattr: _of_mean_function,
    **{fn: _both_function(fn) for fn in _SHAPE_FUNCTIONS},
}

METHOD_RULES: dict[str, Handler] = {
    "relu": _unary(MF.relu_moments),
    "relu_": _unary(MF.relu_moments),
    "sigmoid": _unary(MF.sigmoid_moments),
    "tanh": _unary(MF.tanh_moments),
    "add": _add(1.0),
    "add_": _add(1.0),
    "sub": _add(-1.0),
    "mul": _mul,
    "div": _div,
    "neg": _neg,
    "mean": _mean,
    "sum": _sum,
    "clamp": _clamp_function,
    "clip": _clamp_function,
    "softmax": _softmax_at_output("softmax"),
    "log_softmax": _softmax_at_output("log_softmax"),
    "amax": _amax,
    "size": _of_mean_method,
    "dim": _of_mean_method,
    "numel": _of_mean_method,
    **{name: _both_method for name in _SHAPE_METHODS},
}

# operations that make a deterministic input random: handled even when no input is random
STOCHASTIC_FUNCTIONS = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.dropout, F.alpha_dropout, F.feature_alpha_dropout,
}  # fmt: skip
STOCHASTIC_MODULES: tuple[type, ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)  # fmt: skip


def _rectified_factors(negative_slope: float | None) -> Callable[[Handler], Handler]:
    """On the path of shared sources, a (leaky) ReLU's moments and expected slope in one call (the slope is the
    step of the sources); elsewhere the plain rule (``negative_slope=None``: read it from the call)."""

    def decorate(handler: Handler) -> Handler:
        def wrapped(ctx, node, module, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            if not (isinstance(x, Moments) and x.tape is not None):
                return handler(ctx, node, module, args, kwargs)
            slope = negative_slope
            if slope is None:
                given = module.negative_slope if module is not None else _arg(args, kwargs, 1, "negative_slope", 0.01)
                slope = float(given)
            both = ctx.call(MF.rectified_moments_slope, x.mean, x.var, slope)
            mean, var, scale = (ctx.call(operator.getitem, both, i) for i in range(3))
            share = ctx.call(LR.scale_share, x.tape.share, scale)
            return Moments(mean, var, tape=x.tape.then(Step(LR.scale_back, (scale,)), share))

        return wrapped

    return decorate


for _key, _slope in ((nn.ReLU, 0.0), (nn.LeakyReLU, None)):
    MODULE_RULES[_key] = _rectified_factors(_slope)(MODULE_RULES[_key])
for _key, _slope in ((F.relu, 0.0), (torch.relu, 0.0), (F.leaky_relu, None)):
    FUNCTION_RULES[_key] = _rectified_factors(_slope)(FUNCTION_RULES[_key])
for _method in ("relu", "relu_"):
    METHOD_RULES[_method] = _rectified_factors(0.0)(METHOD_RULES[_method])


def _monotone(handler: Handler) -> Handler:
    """Records ``(input, reapply)`` on the output of a non-decreasing elementwise function of a correlated input."""

    def wrapped(ctx, node, module, args, kwargs):
        out = handler(ctx, node, module, args, kwargs)
        x = args[0] if args else None
        if not (isinstance(out, Moments) and isinstance(x, Moments) and (x.cov is not None or x.tape is not None)):
            return out
        if getattr(module, "negative_slope", 0.0) < 0 or (
            node.target is F.leaky_relu and _arg(args, kwargs, 1, "negative_slope", 0.01) < 0
        ):
            return out

        def reapply(m: Moments) -> Any:
            return handler(ctx, node, module, (m, *args[1:]), kwargs)

        return replace(out, pre=(x, reapply))

    return wrapped


_MONOTONE_MODULES = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.ELU,
    nn.Softplus,
    nn.Hardsigmoid,
    nn.SELU,
    nn.CELU,
)
_MONOTONE_FUNCTIONS = (
    F.relu,
    torch.relu,
    F.leaky_relu,
    torch.sigmoid,
    F.sigmoid,
    torch.tanh,
    F.tanh,
    F.hardtanh,
    F.relu6,
    F.elu,
    F.softplus,
    F.hardsigmoid,
    F.selu,
    torch.clamp,
)
for _cls in _MONOTONE_MODULES:
    MODULE_RULES[_cls] = _monotone(MODULE_RULES[_cls])
for _fn in _MONOTONE_FUNCTIONS:
    FUNCTION_RULES[_fn] = _monotone(FUNCTION_RULES[_fn])
for _name_ in ("relu", "relu_", "sigmoid", "tanh", "clamp"):
    METHOD_RULES[_name_] = _monotone(METHOD_RULES[_name_])


def _is_flatten(node: fx.Node, module: nn.Module | None, args: Sequence[Any]) -> bool:
    """A flatten of everything after the batch dimension."""
    if isinstance(module, nn.Flatten):
        return module.start_dim == 1 and module.end_dim == -1
    if node.target is torch.flatten or (node.op == "call_method" and node.target == "flatten"):
        return tuple(args[1:]) in ((1,), (1, -1))
    return False


def _mixing_layer(ctx: RuleContext, node: fx.Node, module: nn.Module | None) -> tuple[fx.Node, tuple | None, int] | None:
    """``(mean weight, conv arguments or None for a linear layer, input width)`` of a Linear/Conv layer
    (fixed weights, or bayesian-torch's mean weights) with zero padding; ``None`` for anything else."""
    if isinstance(module, nn.Linear):
        return ctx.attr(f"{node.target}.weight"), None, module.in_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        conv = (module.stride, module.padding, module.dilation, module.groups)
        return ctx.attr(f"{node.target}.weight"), conv, module.in_channels
    if module is not None and isinstance(module, bayesian_layer_types()):
        if hasattr(module, "mu_weight"):
            return ctx.attr(f"{node.target}.mu_weight"), None, module.mu_weight.shape[1]
        if module.mu_kernel.dim() in (3, 4) and not isinstance(module.padding, str):
            conv = (module.stride, module.padding, module.dilation, module.groups)
            return ctx.attr(f"{node.target}.mu_kernel"), conv, module.mu_kernel.shape[1] * module.groups
    return None


def _gaussian_conv_sources(
    ctx: RuleContext, node: fx.Node, module: nn.Module, x: Any, conv: tuple
) -> tuple[Step, fx.Node] | None:  # fmt: skip
    """The source step and share of a bayesian-torch convolution's own weights (one draw shared by every position)."""
    if conv[3] != 1:
        return None
    dims = module.mu_kernel.dim() - 2
    weight_var = ctx.call(_softplus_square, ctx.attr(f"{node.target}.rho_kernel"))
    has_bias = getattr(module, "mu_bias", None) is not None
    bias_var = ctx.call(_softplus_square, ctx.attr(f"{node.target}.rho_bias")) if has_bias else None
    stride, padding, dilation = (MF._tuple(v, dims) for v in conv[:3])
    out = ctx.call(LR.gaussian_conv_sources, ctx.moments(x).mean, weight_var, bias_var, stride, padding, dilation)
    patches, sd, share = (ctx.call(operator.getitem, out, i) for i in range(3))
    return Step(LR.channel_sources, (patches, sd), source=True), share


def _linear_map_step(
    ctx: RuleContext, node: fx.Node, module: nn.Module | None, x: Moments, out: Moments, share: fx.Node
) -> tuple[Step, fx.Node] | None:  # fmt: skip
    """The step and share of a linear map that is not a plain linear/conv layer: eval-mode batch norm, nearest
    upsampling (copies), equal-window adaptive average pooling, a transposed convolution; ``None`` for anything else."""
    nearest = isinstance(module, nn.Upsample) or (node.target is F.interpolate and node.op == "call_function")
    if nearest:  # the rules accept nearest modes only
        return Step(LR.copies_back, (x.mean,)), ctx.call(LR.copies_share, share, out.mean)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_var is not None:
        weight = ctx.attr(f"{node.target}.weight") if module.weight is not None else None
        scale = ctx.call(LR.batch_norm_scale, ctx.attr(f"{node.target}.running_var"), weight, module.eps, x.mean)
        return Step(LR.scale_back, (scale,)), ctx.call(LR.scale_share, share, scale)
    if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        return Step(LR.average_back, (x.mean,)), ctx.call(LR.average_share, share, out.mean)
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) and module.padding_mode == "zeros":
        weight = ctx.attr(f"{node.target}.weight")
        conv = (module.stride, module.padding, module.dilation, module.groups)
        spread = ctx.call(
            F.conv_transpose1d if isinstance(module, nn.ConvTranspose1d) else F.conv_transpose2d
            if isinstance(module, nn.ConvTranspose2d) else F.conv_transpose3d,
            share, ctx.call(operator.mul, weight, weight), None, module.stride, module.padding, module.output_padding,
            module.groups, module.dilation,
        )  # fmt: skip
        return Step(LR.conv_transpose_back, (weight, *conv)), spread
    return None


def factor_update(ctx: RuleContext, node: fx.Node, module: nn.Module | None, args: Sequence[Any], out: Any) -> Any:
    """``covariance="low_rank"``: record the layers on the path of shared noise sources (:class:`Tape`), swept
    back from the logits at the output (:func:`logit_sources`).

    Sources: dropout (``Dropout``/``F.dropout``, one per unit), Gaussian-weight convolutions (the weights
    of an output channel, shared by all its positions) and a random input (``propagate_moments``, one per
    unit). Steps: ``Linear``/``Conv1d/2d/3d`` (fixed or mean weights, zero padding), ``ConvTranspose1d/2d/3d``,
    ``BatchNorm1d/2d/3d`` (running statistics), (leaky) ReLU, max pooling without padding, nearest upsampling, equal-window adaptive average pooling,
    flatten, dropout. Any other operation ends the path (its output is treated per unit).
    """
    if isinstance(out, tuple) and out and isinstance(out[0], Moments):  # bayesian-torch's (out, kl)
        return (factor_update(ctx, node, module, args, out[0]), *out[1:])
    x = args[0] if args else None
    if not isinstance(out, Moments):
        return out
    tape = x.tape if isinstance(x, Moments) else None
    if not ctx.low_rank:  # last_layer: a linear layer's inputs as independent sources
        layer = _mixing_layer(ctx, node, module)
        if layer is None or layer[1] is not None or not isinstance(x, Moments):
            return out
        source = Step(LR.diag_sources, (ctx.call(torch.sqrt, x.var),), source=True)
        return replace(out, tape=Tape((source, Step(LR.linear_back, (layer[0],))), out.var))
    if type(module) is nn.Dropout or node.target is F.dropout:
        std = ctx.call(LR.dropout_std, out.var, x.var if isinstance(x, Moments) else None)
        own = ctx.call(operator.mul, std, std)
        source = Step(LR.diag_sources, (std,), source=True)
        tape = Tape((source,), own) if tape is None else tape.then(source, ctx.call(operator.add, tape.share, own))
        return replace(out, tape=tape)
    if _is_flatten(node, module, args):
        if tape is None:
            return out
        return replace(out, tape=tape.then(Step(LR.flatten_back, (x.mean,)), ctx.method("flatten", tape.share, 1)))
    if tape is not None and isinstance(x, Moments):
        linear_map = _linear_map_step(ctx, node, module, x, out, tape.share)
        if linear_map is not None:
            return replace(out, tape=tape.then(*linear_map))
    layer = _mixing_layer(ctx, node, module)
    if layer is None:
        return out
    weight, conv, _ = layer
    if tape is not None and conv is None:
        tape = tape.then(Step(LR.linear_back, (weight,)), ctx.call(F.linear, tape.share, ctx.call(operator.mul, weight, weight)))
    elif tape is not None:
        tape = tape.then(Step(LR.conv_back, (weight, x.mean, *conv)), ctx.call(LR.conv_share, tape.share, weight, *conv))
    own = None
    if conv is not None and module is not None and isinstance(module, bayesian_layer_types()):
        own = _gaussian_conv_sources(ctx, node, module, x, conv)
    if own is not None:
        tape = Tape((own[0],), own[1]) if tape is None else tape.then(own[0], ctx.call(operator.add, tape.share, own[1]))
    return replace(out, tape=tape)


def logit_sources(ctx: RuleContext, result: Moments) -> tuple[fx.Node, fx.Node]:
    """The adjoint sweep at the output: the logits' variance with the shared sources' covariance, and their factor ``[N, K, C]``."""
    if result.tape is None:
        return result.var, ctx.call(LR.no_sources, result.mean)
    steps = list(reversed(result.tape.steps))
    if not steps[0].source and steps[0].fn is LR.linear_back:  # from I: the weight's rows, no product
        g = ctx.call(LR.linear_start, result.mean, *steps[0].args)
        steps = steps[1:]
    else:
        g = ctx.call(LR.sweep_start, result.mean)
    factors = []
    for step in steps:
        if step.source:
            factors.append(ctx.call(step.fn, g, *step.args))
        else:
            g = ctx.call(step.fn, g, *step.args)
    terms = [ctx.call(LR.factor_variance, f) for f in factors]
    var = ctx.call(LR.corrected_var, result.mean, result.var, result.tape.share, terms)
    return var, ctx.call(LR.logit_factor, result.mean, factors)  # unused (and dropped) unless output="factor"


def bayesian_layer_types() -> tuple[type, ...]:
    """bayesian-torch's Gaussian-weight layers (reparameterization and flipout share the posterior)."""
    try:
        from bayesian_torch.layers import flipout_layers as flip
        from bayesian_torch.layers import variational_layers as var
    except ImportError:  # optional: without bayesian-torch there are no such layers to meet
        return ()
    return (
        var.LinearReparameterization, var.Conv1dReparameterization, var.Conv2dReparameterization,
        var.Conv3dReparameterization, flip.LinearFlipout, flip.Conv1dFlipout, flip.Conv2dFlipout, flip.Conv3dFlipout,
    )  # fmt: skip


def module_rule(module: nn.Module) -> Handler | None:
    """The handler for a leaf module, by its most specific registered class."""
    for cls in type(module).__mro__:
        if cls in MODULE_RULES:
            return MODULE_RULES[cls]
    if isinstance(module, bayesian_layer_types()):
        return _bayesian_layer
    return None
