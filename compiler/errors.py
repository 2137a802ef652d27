"""Errors a user can cause, reported as one line with exit code 2 (``--debug`` shows the traceback)."""

from __future__ import annotations

import difflib
from typing import Iterable

USER_ERROR_EXIT_CODE = 2


class TqcError(Exception):
    """A mistake in what the user gave tqc (a path, a model, a pipeline, data); never a tqc bug."""

    exit_code = USER_ERROR_EXIT_CODE


class VerificationError(TqcError):
    """A pass produced a graph that failed its verification; carries a reproducer when there is one."""

    def __init__(self, message: str, reproducer: str | None = None):
        super().__init__(message)
        self.reproducer = reproducer


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest candidate, or a list of what exists."""
    candidates = sorted(candidates)
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (known: {', '.join(candidates)})"
