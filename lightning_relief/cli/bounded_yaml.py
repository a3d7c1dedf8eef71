"""YAML loading with bounds, for recipes that may come from anyone.

YAML aliases let a few hundred bytes stand for billions of nodes (the "billion
laughs"); PyYAML builds them as shared objects, and the first deep copy or walk
of the result runs out of memory. Before a document is constructed its node
is measured: the size of the text, the nesting depth and the number of nodes
once every alias is expanded (an alias counts the size its anchor had, so the
check is linear in the text). Recursive aliases are refused too.

``relief`` registers :func:`load` as jsonargparse's loader for its parser mode
:data:`MODE`, so every recipe and every command-line value goes through it.

>>> load("a: [1, 2, {b: c}]")
{'a': [1, 2, {'b': 'c'}]}
>>> bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\\n" + "".join(
...     f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\\n" for i in range(6))
>>> len(bomb) < 500
True
>>> load(bomb)
Traceback (most recent call last):
...
lightning_relief.cli.bounded_yaml.YAMLBoundsError: YAML document expands to more than 100000 nodes through aliases (a YAML bomb?)
"""

from __future__ import annotations

from typing import Any

import yaml

MODE = "relief_yaml"
MAX_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_NODES = 100_000


class YAMLBoundsError(yaml.YAMLError):
    """A YAML document over the size, depth or expanded-node bounds."""


def check(text: str, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> None:
    """Raise :class:`YAMLBoundsError` if ``text`` is too large, too deep, recursive or an alias bomb.

    Works on the parser's event stream (libyaml's when available, no recursion):
    each open collection counts its expanded size, an alias adds the size and
    depth its anchor had when it was closed.
    """
    if len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise YAMLBoundsError(f"YAML document is larger than {max_bytes} bytes")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    anchors: dict[str, tuple[int, int]] = {}  # anchor -> (expanded size, depth)
    frames: list[list[Any]] = [[0, 0, None]]  # per open collection: size, depth of its deepest child, anchor
    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.CollectionStartEvent):
                frames.append([0, 0, event.anchor])
                if len(frames) - 1 > max_depth:
                    raise YAMLBoundsError(f"YAML document is nested deeper than {max_depth} levels")
                continue
            if isinstance(event, yaml.AliasEvent):
                if event.anchor not in anchors:
                    raise YAMLBoundsError(f"YAML alias *{event.anchor} refers to an undefined or enclosing anchor (recursive)")
                size, depth = anchors[event.anchor]
            elif isinstance(event, yaml.ScalarEvent):
                size, depth = 1, 1
                if event.anchor:
                    anchors[event.anchor] = (size, depth)
            elif isinstance(event, yaml.CollectionEndEvent):
                size, depth, anchor = frames.pop()
                size, depth = size + 1, depth + 1
                if anchor:
                    anchors[anchor] = (size, depth)
            else:  # stream and document events
                continue
            frames[-1][0] += size
            frames[-1][1] = max(frames[-1][1], depth)
            if len(frames) - 1 + depth > max_depth:
                raise YAMLBoundsError(f"YAML document is nested deeper than {max_depth} levels")
            if sum(f[0] for f in frames) > max_nodes:
                raise YAMLBoundsError(f"YAML document expands to more than {max_nodes} nodes through aliases (a YAML bomb?)")
    finally:
        loader.dispose()


def load(text: str) -> Any:
    """jsonargparse's YAML loading, after :func:`check`."""
    from jsonargparse._loaders_dumpers import yaml_load

    check(text)
    return yaml_load(text)


def register() -> None:
    """Make :data:`MODE` a jsonargparse parser mode that loads with :func:`load`."""
    from jsonargparse import set_loader

    set_loader(MODE, load, exceptions=(yaml.YAMLError,))
