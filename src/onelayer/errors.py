"""The one exception type users see: a one-line message that names the bad value and the fix."""


class OneLayerError(Exception):
    """A user-facing error. The CLI prints its message without a traceback and exits non-zero."""


class FastEngineUnavailable(OneLayerError):
    """The fast rollout engine cannot run a model (an unsupported architecture, or a failed self-check);
    work that needs it can fall back to ``generate``."""


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message (its type's name when it has none), to quote another
    library's error inside a one-line :class:`OneLayerError`."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def did_you_mean(word: str, choices) -> str:
    """``"; did you mean 'rg:chain_sum'?"`` for the choice closest to a mistyped ``word``, else empty."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""
