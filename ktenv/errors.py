"""One error type for everything a user can get wrong or the world can refuse.

The CLI prints `str(err)` and exits with `err.exit_code`; nothing else is shown,
so each message must be a complete paragraph: what happened, why it matters,
what to do next.
"""


class KtenvError(Exception):
    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class SpecError(KtenvError):
    """envs/*.toml is malformed or inconsistent."""


class ResolveError(KtenvError):
    """uv could not resolve, or could not reach the index."""


class LockStale(KtenvError):
    """`lock --check`: the inputs changed since the lock was written."""

    exit_code = 1
