"""Output conventions shared by every command: --json, tables, progress bars, errors -> exit codes."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

import click

from registry.errors import EXIT_ERROR, EXIT_INCOMPATIBLE, EXIT_INTEGRITY, PfxError

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON (stable keys) instead of text.")


def emit(data: Any, as_json: bool, human: Callable[[Any], None] | None = None) -> None:
    """Print `data` as JSON (stable, sorted keys) or through `human`."""
    if as_json or human is None:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        human(data)


def table(rows: Iterable[dict], columns: list[tuple[str, str]]) -> None:
    """A plain aligned table; `columns` is [(key, heading)]."""
    rows = list(rows)
    if not rows:
        return
    cells = [[h for _, h in columns]] + [["" if r.get(k) is None else str(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def interactive() -> bool:
    return sys.stderr.isatty() and sys.stdout.isatty()


class _NullBar:
    def update(self, n: int = 1, **_: Any) -> None:
        pass

    def set_postfix(self, text: str) -> None:
        pass


class _Bar:
    def __init__(self, bar, label: str):
        self._bar = bar
        self._label = label

    def update(self, n: int = 1, **_: Any) -> None:
        self._bar.update(n)

    def set_postfix(self, text: str) -> None:
        self._bar.label = f"{self._label} {text}"


@contextmanager
def progress(total: int, label: str):
    """One progress bar on stderr when attached to a terminal; silent otherwise."""
    if not interactive() or total <= 0:
        yield _NullBar()
        return
    with click.progressbar(length=total, label=label, file=sys.stderr, show_eta=True, show_pos=True) as bar:
        yield _Bar(bar, label)


def error_exit_code(exc: BaseException) -> int | None:
    """Exit code for an exception a user can cause, or None for a bug (which shows a traceback)."""
    if isinstance(exc, PfxError):
        return exc.exit_code
    from perfusion_hub.concept import ConceptFormatError, ConceptMismatchError

    if isinstance(exc, ConceptFormatError):
        return EXIT_INTEGRITY
    if isinstance(exc, ConceptMismatchError):
        return EXIT_INCOMPATIBLE
    from perfusion_hub.errors import EngineError

    if isinstance(exc, EngineError):
        return getattr(exc, "exit_code", EXIT_ERROR)
    # The environment, not a bug: disk full (ENOSPC/EFBIG), an unwritable or missing folder, a path
    # component that is a file. The message names the path and the reason.
    if isinstance(exc, OSError):
        return EXIT_ERROR
    import sqlite3

    if isinstance(exc, sqlite3.OperationalError) and any(
            s in str(exc) for s in ("disk", "full", "readonly", "unable to open", "locked")):
        return EXIT_ERROR
    return None
