"""Command-line commands: one module per ``python -m sparsefast <command>``."""
from __future__ import annotations

import sys


def usage_error(prog: str, message: str) -> int:
    """Report a bad command-line value argparse-style — one line ``<prog>: error: <message>`` on stderr —
    and return the exit status 2 (the command's ``main`` returns it)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2
