"""Errors and exit codes of ``tqc`` (the contract; README "Errors" lists the same table).

    0    ok
    1    a verification or quality check failed (``VerificationError``; ``tqc check`` finding blockers)
    2    a user mistake: one line ``tqc: error: ...`` (``TqcError``; bad paths, options, models, data)
    3    an internal error: a bug in tqc; the line says so and points to ``--debug`` for the traceback
    130  interrupted by SIGINT (Ctrl-C), 143 by SIGTERM: every temp file and folder removed, no output written
"""

from __future__ import annotations

import difflib
from typing import Iterable

OK_EXIT_CODE = 0
CHECK_FAILED_EXIT_CODE = 1
USER_ERROR_EXIT_CODE = 2
INTERNAL_ERROR_EXIT_CODE = 3
SIGINT_EXIT_CODE = 130
SIGTERM_EXIT_CODE = 143


class TqcError(Exception):
    """A mistake in what the user gave tqc (a path, a model, a pipeline, data); never a tqc bug."""

    exit_code = USER_ERROR_EXIT_CODE


class VerificationError(TqcError):
    """A pass produced a graph that failed its verification; carries a reproducer when there is one."""

    exit_code = CHECK_FAILED_EXIT_CODE

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
