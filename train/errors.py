"""The one exception type for mistakes a user can fix (bad config, missing data, bad checkpoint).

`train/main.py` turns it into a single line on stderr and exit status 2, without a traceback.
"""


class UserError(Exception):
    """A problem the user caused and can fix; the message names the problem and the fix."""


def brief(e: BaseException) -> str:
    """An underlying exception in a few words, for inside a one-line message."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
