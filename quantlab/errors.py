"""Errors that carry the file and the field a user has to fix.

Bad input raises :class:`InputError`; the CLI prints its one-line message and exits 2.
Anything else that escapes is a bug in quantlab and exits 1.
"""

from __future__ import annotations

import os

MAX_MESSAGE_CHARS = 1000


class InputError(Exception):
    """Bad user input: a file, a field in it, and what is wrong with it."""

    def __init__(self, path: str | os.PathLike | None, field: str | None, message: str):
        self.path = None if path is None else os.fspath(path)
        self.field = None if field is None else str(field)  # a YAML key can be an int: `1: x`
        self.message = message
        super().__init__(self.one_line())

    def one_line(self) -> str:
        parts = [p for p in (self.path, self.field) if p]
        where = ": ".join(parts)
        text = f"{where}: {self.message}" if where else self.message
        text = " ".join(text.split())  # never more than one line
        if len(text) > MAX_MESSAGE_CHARS:  # a hostile file can put megabytes into a quoted value
            text = text[: MAX_MESSAGE_CHARS - 30] + f"... ({len(text)} characters)"
        return text


class QualityBudgetError(Exception):
    """The quantized model missed the quality budget the user set (``--max-kld``, ``--min-top1``).

    The CLI prints the measured figures against the budget and exits 3; nothing is written.
    """


class SizeOverrunError(Exception):
    """An artifact written under ``--max-size`` came out larger than the size; it is not kept."""

    def __init__(self, written: int, budget: int):
        self.written, self.budget = written, budget
        super().__init__(f"the artifact came to {written / 1e6:.3f} MB, over {budget / 1e6:.3f} MB")
