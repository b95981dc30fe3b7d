"""One error type for everything a user can fix, always naming the fix."""

from __future__ import annotations

import sys
from contextlib import contextmanager


class GlmsnakeError(Exception):
    """A problem the user can fix; the message says what is wrong and how to fix it."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")


@contextmanager
def refused_without_traceback(exit_code: int = 2):
    """A user mistake ends the process with its problem and fix on stderr, never a traceback.

    SystemExit, not an exception, so that Snakemake (which prints a traceback for any error
    raised in a Snakefile) exits quietly too. Internal errors pass through untouched.
    """
    try:
        yield
    except GlmsnakeError as e:
        print(f"glmsnake: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(exit_code) from None
