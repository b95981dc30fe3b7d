"""One error type for everything a user can fix, always naming the fix."""


class GlmsnakeError(Exception):
    """A problem the user can fix; the message says what is wrong and how to fix it."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")
