"""The ``relief`` command: LightningCLI's subcommands plus our own.

``relief fit|validate|test|predict --config RECIPE`` runs LightningCLI;
``relief recipes`` and the other commands in :data:`COMMANDS` are dispatched
to their modules, each exposing ``main(argv) -> int``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# command -> "module:function"; a function takes argv (after the command) and returns an exit code
COMMANDS: dict[str, tuple[str, str]] = {
    "recipes": ("lightning_relief.cli.recipes:main", "list the shipped recipes, or `show NAME` to print one"),
    "export": ("lightning_relief.cli.export:main", "compile a checkpoint for a target with TVM"),
    "robustness": ("lightning_relief.cli.robustness:main", "evaluate a checkpoint under analog noise and drift"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        module_name, _, function_name = COMMANDS[args[0]][0].partition(":")
        try:
            command = getattr(importlib.import_module(module_name), function_name)
        except ImportError as err:
            print(f"relief: error: command {args[0]!r} is not available: {err}", file=sys.stderr)
            return 2
        return int(command(args[1:]) or 0)
    if not args or args[0] in ("-h", "--help"):
        print("relief: Lightning plugins for compressed, noise-robust, uncertainty-aware models\n")
        print("LightningCLI subcommands: fit, validate, test, predict   (relief fit --config recipes/quickstart.yaml)")
        print("Other commands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<12} {help_text}")
        print()
    from lightning_relief.cli.lightning import run_lightning_cli

    run_lightning_cli(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
