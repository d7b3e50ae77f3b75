"""The one error type sdkit raises for bad input: what went wrong and how to fix it."""

from __future__ import annotations


class SdkitError(Exception):
    """A user-facing error: names the file or field, what was expected, and the fix."""

    def __init__(self, message: str, *, fix: str = "") -> None:
        self.message = message
        self.fix = fix
        super().__init__(f"{message}\n  fix: {fix}" if fix else message)
