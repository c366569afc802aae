"""The one exception type for mistakes a user can fix (bad config, missing data, bad checkpoint).

`train/main.py` turns it into a single line on stderr and exit status 2, without a traceback.
"""


class UserError(Exception):
    """A problem the user caused and can fix; the message names the problem and the fix."""
