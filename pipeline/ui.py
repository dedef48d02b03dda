"""Console output shared by every command: one rich console, progress bars that degrade to
plain lines when the output is a log file rather than a terminal."""
from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

console = Console(highlight=False, soft_wrap=True)   # long lines (paths) are not broken in logs


def progress(*extra_columns) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    *extra_columns, TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=console, disable=not console.is_terminal)
