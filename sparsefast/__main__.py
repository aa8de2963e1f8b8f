"""``python -m sparsefast <command>``: demo, bench, info, export, kernels (one module per command
in :mod:`sparsefast.cli`, each with ``main(argv) -> int``)."""
from __future__ import annotations

import importlib
import pkgutil
import sys

from . import cli


def _commands() -> dict[str, str]:
    out = {}
    for m in pkgutil.iter_modules(cli.__path__):
        if not m.name.startswith("_"):
            out[m.name] = m.name
    return out


def _summary(name: str) -> str:
    try:
        doc = importlib.import_module(f"sparsefast.cli.{name}").__doc__ or ""
    except Exception as e:  # noqa: BLE001
        return f"(unavailable: {type(e).__name__}: {e})"
    return doc.strip().splitlines()[0] if doc.strip() else ""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmds = _commands()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage: python -m sparsefast <command> [options]\n\ncommands:")
        for name in sorted(cmds):
            print(f"  {name:10s} {_summary(name)}")
        print("\n`python -m sparsefast <command> --help` for a command's options.")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in cmds:
        print(f"sparsefast: unknown command {name!r}; choose from {', '.join(sorted(cmds))}", file=sys.stderr)
        return 2
    return int(importlib.import_module(f"sparsefast.cli.{name}").main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
