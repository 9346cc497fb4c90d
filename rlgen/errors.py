"""User-facing errors: the CLI prints them as one line and exits with status 2."""


class RlgenError(Exception):
    """Bad input or configuration that the user can fix (exit status 2)."""


class RewardError(RlgenError):
    """A reward raised or returned a non-finite value."""
