"""Command-line commands: one module per ``python -m sparsefast <command>``."""
