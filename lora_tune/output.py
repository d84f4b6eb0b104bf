"""The terminal console shared by the commands."""

from __future__ import annotations

from rich.console import Console


def console(stderr: bool = False) -> Console:
    """A console that never breaks paths in messages, with room for whole tables in logs and pipes."""
    result = Console(soft_wrap=True, stderr=stderr)
    if not result.is_terminal:
        result.width = 140
    return result
