"""User-facing errors: the CLI prints them as one line and exits with status 2."""


class RlgenError(Exception):
    """Bad input or configuration that the user can fix (exit status 2)."""


class RewardError(RlgenError):
    """A reward raised or returned a non-finite value."""


def show_value(value: object, limit: int = 200) -> str:
    """repr() of a user-supplied value for an error message, cut to `limit` characters so that a huge
    (or maliciously expanded) value cannot flood the terminal or the log."""
    try:
        text = repr(value)
    except ValueError:  # an int too long for Python to print (over 4300 digits)
        if isinstance(value, int):
            return f"<an integer of about {int(value.bit_length() * 0.30103)} digits>"
        return "<a value holding an integer too long to print>"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"
