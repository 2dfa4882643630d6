"""The one exception type that means "the user asked for something we cannot do".

The CLI turns it into a single line on stderr and exit status 2, with no traceback; everything else is a
bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input: names the bad value and what is expected."""


def require_at_least(*checks: tuple[str, float, float]) -> None:
    """(flag, value, lowest allowed) for each numeric flag: the first one below its bound is an error."""
    for flag, value, low in checks:
        if value < low:
            raise UserError(f"{flag} {value}: must be at least {low}")
