"""A Relax pass that gives integer conv/matmul their integer operands back.

PyTorch has no int8 convolution, so integer layers are written as
``conv1d/conv2d(x_int8.to(int32), w_int8.to(int32))``. TVM's importer then sees int32
operands and (for conv/linear) even declares a float32 result, so the kernel
would multiply 32-bit values converted to float. This pass strips the widening
casts (looking through transposes) and emits ``conv2d/matmul(int8|uint8,
int8, out_dtype="int32")`` (conv1d likewise): int8 loads, int32 accumulation, the form
MetaSchedule can vectorise. The result is cast to the dtype the graph expected,
so the rest of the graph is unchanged.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

_NARROW = ("int8", "uint8")
_CONV = tvm.ir.Op.get("relax.nn.conv2d")
_CONV1D = tvm.ir.Op.get("relax.nn.conv1d")
_MATMUL = tvm.ir.Op.get("relax.matmul")
_ASTYPE = tvm.ir.Op.get("relax.astype")
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")


def _dtype(expr: relax.Expr) -> str | None:
    info = expr.ty
    return str(info.dtype) if isinstance(info, relax.TensorType) else None


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule | None = None) -> None:
        super().__init__(mod)
        self.rewritten = 0

    def _narrow(self, expr: relax.Expr) -> relax.Expr | None:
        """``expr`` without its int8→int32 widening cast (through transposes), or None."""
        value = self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr
        if not isinstance(value, relax.Call):
            return None
        if value.op == _ASTYPE and str(value.attrs.dtype) == "int32" and _dtype(value.args[0]) in _NARROW:
            return value.args[0]
        if value.op == _PERMUTE:
            inner = self._narrow(value.args[0])
            if inner is not None:
                return self.builder_.emit(relax.op.permute_dims(inner, value.attrs.axes))
        return None

    def visit_call_(self, op: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(op)
        if call.op not in (_CONV, _CONV1D, _MATMUL) or len(call.args) != 2:
            return call
        if _dtype(call.args[0]) != "int32" or _dtype(call.args[1]) != "int32":
            return call
        a, b = self._narrow(call.args[0]), self._narrow(call.args[1])
        if a is None or b is None:
            return call
        if call.op in (_CONV, _CONV1D):
            attrs = call.attrs
            new = (relax.op.nn.conv2d if call.op == _CONV else relax.op.nn.conv1d)(
                a,
                b,
                strides=attrs.strides,
                padding=attrs.padding,
                dilation=attrs.dilation,
                groups=attrs.groups,
                data_layout=attrs.data_layout,
                kernel_layout=attrs.kernel_layout,
                out_layout=attrs.out_layout,
                out_dtype="int32",
            )
        else:
            new = relax.op.matmul(a, b, out_dtype="int32")
        self.rewritten += 1
        expected = _dtype(op)
        if expected and expected != "int32":
            return relax.op.astype(self.builder_.emit(new), expected)
        return new


@tvm.transform.module_pass(opt_level=0, name="IntegerOperands")
class IntegerOperands:
    """Module pass: integer conv2d/matmul on int8 operands with int32 accumulation."""

    def __init__(self) -> None:
        self.rewritten = 0

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Rewriter(mod)
        for gvar, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                new_func = rewriter.visit_expr(func)
                mod.update_func(gvar, new_func)
        self.rewritten = rewriter.rewritten
        return relax.transform.DeadCodeElimination()(mod)
