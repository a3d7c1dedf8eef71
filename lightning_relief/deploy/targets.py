"""Target descriptions: strings, dicts and ``tvm.target.Target`` in one canonical form.

TVM 0.27 refuses the old ``"llvm -mcpu=..."`` strings; we still accept them (and
dicts, and Target objects) and turn them into a dict-built Target. ``"llvm"``
and ``"native"`` mean *this* CPU: the host's ``mcpu`` and core count, because
plain ``llvm`` generates generic x86-64 code without the vector units that
tuned schedules need.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import shlex
from typing import Any, Union

import tvm

TargetLike = Union[str, dict, "tvm.target.Target"]

_HOST_ALIASES = ("llvm", "native", "cpu")

# boards by name: the CPU each one has, for code that TVM cross-compiles on this machine
BOARDS: dict[str, dict[str, Any]] = {
    "rpi4": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"], "num-cores": 4},
    "x86-avx2": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"},
    "x86-avx512": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"},
}
BOARDS["raspberry-pi-4"] = BOARDS["rpi4"]

# the C cross compiler of each foreign architecture, and the Debian package that installs it
CROSS_COMPILERS: dict[str, tuple[str, str]] = {
    "aarch64": ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
    "arm": ("arm-linux-gnueabihf-gcc", "gcc-arm-linux-gnueabihf"),
    "riscv64": ("riscv64-linux-gnu-gcc", "gcc-riscv64-linux-gnu"),
}


def host_target_dict() -> dict[str, Any]:
    """The dict of this machine's CPU: ``{"kind": "llvm", "mcpu": ..., "num-cores": ...}``."""
    from tvm.target import codegen

    return {"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu()), "num-cores": os.cpu_count() or 1}


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in dict(value).items()}
    if hasattr(value, "__iter__"):
        return [_plain(v) for v in value]
    return str(value)


def _parse_string(text: str) -> dict[str, Any]:
    text = text.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"target {text!r} is not valid JSON: {err}") from err
    parts = shlex.split(text)
    if not parts:
        raise ValueError("target must not be empty")
    if parts[0] in _HOST_ALIASES and len(parts) == 1:
        return host_target_dict()
    if parts[0] in BOARDS and len(parts) == 1:
        return dict(BOARDS[parts[0]])
    spec: dict[str, Any] = {"kind": parts[0]}
    for part in parts[1:]:
        if not part.startswith("-") or "=" not in part:
            raise ValueError(f"target {text!r}: option {part!r} is not of the form -key=value")
        key, _, value = part.lstrip("-").partition("=")
        spec[key] = int(value) if value.isdigit() else value
    return spec


def target_dict(target: TargetLike) -> dict[str, Any]:
    """A plain, JSON-able dict describing ``target``."""
    if isinstance(target, tvm.target.Target):
        return {str(k): _plain(v) for k, v in dict(target.export()).items()}
    if isinstance(target, dict):
        if "kind" not in target:
            raise ValueError(f"a target dict needs 'kind', got keys {sorted(target)}")
        return dict(target)
    if isinstance(target, str):
        return _parse_string(target)
    raise TypeError(f"target must be a string, dict or tvm.target.Target, got {type(target).__name__}")


def resolve_target(target: TargetLike) -> tvm.target.Target:
    """A ``tvm.target.Target`` for ``target``, checked before anything is compiled.

    Raises :class:`~lightning_relief.deploy.errors.TargetError` naming the bad value: TVM itself
    accepts any ``mcpu`` or triple and only logs a warning before generating generic code.
    """
    from lightning_relief.deploy.errors import TargetError

    if isinstance(target, tvm.target.Target):
        resolved = target
    else:
        spec = target_dict(target)
        try:
            resolved = tvm.target.Target(spec)
        except Exception as err:  # TVM raises its own error types
            raise TargetError(f"target {target!r} is not a valid TVM target: {str(err).splitlines()[-1]}") from err
    spec = target_dict(resolved)
    if spec.get("kind") == "llvm":
        problem = _llvm_problem(str(spec.get("mtriple") or ""), str(spec.get("mcpu") or ""))
        if problem:
            raise TargetError(f"target {target!r}: {problem}")
    return resolved


@functools.lru_cache(maxsize=64)
def _llvm_problem(triple: str, cpu: str) -> str:
    """What LLVM does not know about ``triple``/``cpu`` (empty if both are valid)."""
    from tvm.target import codegen

    if triple and not codegen.llvm_is_valid_cpu("generic", triple):
        return f"mtriple={triple!r} is not a triple LLVM knows (e.g. 'aarch64-linux-gnu', 'x86_64-linux-gnu')"
    if cpu and not codegen.llvm_is_valid_cpu(cpu, triple or str(codegen.llvm_get_system_triple())):
        names = [
            str(n)
            for n in codegen.llvm_get_cpu_archlist(tvm.target.Target({"kind": "llvm", **({"mtriple": triple} if triple else {})}))
        ]
        close = difflib.get_close_matches(cpu, names, n=5, cutoff=0.6)
        where = triple or "this machine's triple"
        hint = f"; did you mean {', '.join(close)}?" if close else f"; LLVM knows {len(names)}, e.g. {', '.join(names[:8])}"
        return f"mcpu={cpu!r} is not a CPU LLVM knows for {where}{hint}"
    return ""


def with_num_cores(target: tvm.target.Target) -> tvm.target.Target:
    """MetaSchedule needs ``num-cores`` on CPU targets: fill it in from this machine if absent."""
    spec = target_dict(target)
    if spec.get("kind") == "llvm" and "num-cores" not in spec:
        spec["num-cores"] = os.cpu_count() or 1
        return tvm.target.Target(spec)
    return target


def target_key(target: TargetLike) -> str:
    """A stable string for cache keys: the target's attributes, sorted."""
    spec = target_dict(resolve_target(target))
    spec.pop("tag", None)
    spec.pop("keys", None)
    return json.dumps(spec, sort_keys=True, default=str)


def is_cpu(target: TargetLike) -> bool:
    return target_dict(resolve_target(target)).get("kind") in ("llvm", "c")


def device_for(target: TargetLike, session: Any = None) -> tvm.runtime.Device:
    """The device that runs code built for ``target``: local, or on an RPC ``session``."""
    kind = target_dict(resolve_target(target)).get("kind", "llvm")
    owner = session if session is not None else tvm
    if kind in ("llvm", "c"):
        return owner.cpu(0)
    if kind in ("cuda", "nvptx"):
        return owner.cuda(0)
    if kind == "rocm":
        return owner.rocm(0)
    if kind == "vulkan":
        return owner.vulkan(0)
    if kind == "opencl":
        return owner.cl(0)
    if kind == "metal":
        return owner.metal(0)
    raise ValueError(f"no device known for target kind {kind!r}")


def _arch(name: str) -> str:
    arch = name.split("-", 1)[0]
    return "arm" if arch.startswith(("armv", "thumb")) or arch == "arm" else "aarch64" if arch == "arm64" else arch


def target_arch(target: TargetLike) -> str:
    """The CPU architecture code for ``target`` runs on (``"x86_64"``, ``"aarch64"``...), from its triple."""
    import platform

    return _arch(str(target_dict(resolve_target(target)).get("mtriple") or platform.machine()))


def is_foreign(target: TargetLike) -> bool:
    """Whether code for ``target`` cannot run on this machine (a CPU of another architecture)."""
    import platform

    return is_cpu(target) and target_arch(target) != _arch(platform.machine())


def cross_compiler_for(target: TargetLike) -> Any:
    """TVM's ``fcompile`` for ``export_library`` when ``target`` is another architecture, else ``None``.

    Raises ``DeployError`` naming the Debian package when the cross compiler is not installed.
    """
    import shutil

    from lightning_relief.deploy.errors import DeployError

    if not is_foreign(target):
        return None
    arch = target_arch(target)
    if arch not in CROSS_COMPILERS:
        raise DeployError(f"no cross compiler known for {arch}; known: {', '.join(CROSS_COMPILERS)}")
    compiler, package = CROSS_COMPILERS[arch]
    if shutil.which(compiler) is None:
        raise DeployError(f"building for {arch} needs the cross compiler {compiler}: apt-get install {package}")
    from tvm.support import cc

    return cc.cross_compiler(compiler)
