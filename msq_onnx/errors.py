"""Error types that map to the documented exit codes.

The CLI turns each of these into one line on stderr; anything else is an
internal error. Keeping the codes here (not in the CLI) lets the API and the
tests agree with the README without importing argparse code.
"""

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_GATE_FAILED = 3


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (checker and ORT messages span several), or its type if empty."""
    text = " ".join(str(exc).split())
    return text[:limit] if text else type(exc).__name__


class MsqError(Exception):
    """A problem the user can fix; the message names it and what to do."""

    exit_code = EXIT_BAD_INPUT


class BadModel(MsqError):
    pass


class BadData(MsqError):
    pass


class BadOption(MsqError):
    pass


class GateFailed(MsqError):
    exit_code = EXIT_GATE_FAILED
