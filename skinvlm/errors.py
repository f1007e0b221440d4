"""The one error type a user sees: the CLI prints it as a single line and exits 1."""


class SkinvlmError(Exception):
    """Something the user must fix: bad input, a missing stage, a bad setting, a refused request."""
