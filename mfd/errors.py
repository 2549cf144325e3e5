"""Errors of mfd: each carries one line a user can act on.

The CLI prints ``str(error)`` on stderr and exits 1; anything else escaping is a bug.
"""


class MfdError(Exception):
    """Base class: a failure the user should see as one clear line."""


class UsageError(MfdError):
    """A wrong option or argument (exit status 2)."""


class ProtocolError(MfdError):
    """Bytes read from a file or a socket do not follow the format.

    The message names where (file offset or channel), what was read and what was expected.
    """


class Truncated(ProtocolError):
    """The bytes end inside a field: a file is cut short, or a socket's next bytes have not
    arrived yet (a decoder fed as bytes arrive waits for more). ``missing``: how many more
    bytes the field needs, where known (0: unknown)."""

    def __init__(self, message: str, missing: int = 0) -> None:
        super().__init__(message)
        self.missing = missing


class BrokenPipeline(MfdError):
    """A worker died or reported an error; the pipeline refuses further work.

    ``link_lost``: a channel's connection to the other host went away (the other end's own
    message, if it sent one, says why better)."""

    def __init__(self, message: str, link_lost: bool = False) -> None:
        super().__init__(message)
        self.link_lost = link_lost


class GuestError(MfdError):
    """The guest process is missing, refused a command, or died."""


class Cancelled(MfdError):
    """``migrate_cancel``, the timeout, or Ctrl-C."""
