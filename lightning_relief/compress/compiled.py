"""Compress a ``torch.compile``-d model: work on the eager module underneath, then let dynamo recompile.

A compiled submodule (``torch.compile(net)``, an ``OptimizedModule``) cannot be
traced by torch-pruning nor seen by forward hooks, and its names carry an
``_orig_mod.`` prefix; a LightningModule compiled whole (``trainer.fit(torch.compile(module))``)
has its ``forward`` replaced by a compiled one (Lightning's ``_compiler_ctx``).
:func:`uncompiled` swaps in the eager modules and forward for the duration of a
block and puts the compiled wrappers back afterwards, around the same (now
compressed) modules: the wrappers' guards see the new shapes and layer types,
so the next call recompiles.

>>> import torch
>>> from torch import nn
>>> outer = nn.Sequential(torch.compile(nn.Linear(2, 2), backend="eager"))
>>> with uncompiled(outer):
...     type(outer[0]).__name__
'Linear'
>>> type(outer[0]).__name__
'OptimizedModule'
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def _optimized_type() -> type | None:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # a torch without dynamo
        return None
    return OptimizedModule


@contextmanager
def uncompiled(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``module``'s compiled submodules are their eager originals (names without
    ``_orig_mod``) and a Lightning-compiled ``forward`` is the original one."""
    optimized = _optimized_type()
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    ctx = getattr(module, "_compiler_ctx", None)
    compiled_forward = module.__dict__.get("forward") if ctx else None
    if optimized is not None:
        stack = [module]
        while stack:
            parent = stack.pop()
            for name, child in list(parent.named_children()):
                if isinstance(child, optimized):
                    setattr(parent, name, child._orig_mod)
                    swapped.append((parent, name, child))
                    child = child._orig_mod
                stack.append(child)
    if compiled_forward is not None:
        module.forward = ctx["original_forward"]
    try:
        yield module
    finally:
        if compiled_forward is not None:
            module.forward = compiled_forward
        for parent, name, wrapper in reversed(swapped):
            current = getattr(parent, name)
            if current is not wrapper._orig_mod:  # the layer itself was replaced (quantized): compile the new one
                wrapper = type(wrapper)(current, wrapper.dynamo_ctx)
            setattr(parent, name, wrapper)
