"""One error type for everything a user can fix, always naming the fix."""


class GlmsnakeError(Exception):
    """A problem the user can fix; the message says what is wrong and how to fix it."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")


class StepNotImplemented(GlmsnakeError):
    """A workflow step whose implementation has not landed yet."""

    def __init__(self, step: str, issue: str):
        super().__init__(
            f"step '{step}' is not implemented yet ({issue})",
            f"stop the workflow before '{step}' (e.g. `snakemake --until <earlier rule>`) until it lands",
        )
