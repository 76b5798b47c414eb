"""The one exception type users see: a one-line message that names the bad value and the fix."""


class OneLayerError(Exception):
    """A user-facing error. The CLI prints its message without a traceback and exits non-zero."""
