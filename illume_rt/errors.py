"""The one error family of illume-rt.

Every error a user can act on derives from ``IllumeError``; its message is one line that names the fix. The CLI
catches ``IllumeError`` and exits with status 2 (``USER_ERROR_EXIT``); a host embedding the runtime can catch it
the same way. Anything else that escapes is a bug in illume-rt, reported as such (``INTERNAL_ERROR_EXIT``).

Torch-free and import-free on purpose: runtime, engines, export and calibration all derive their errors from here.
"""

from __future__ import annotations

USER_ERROR_EXIT = 2  # bad input, bad bundle, missing package: the message says what to do
INTERNAL_ERROR_EXIT = 70  # EX_SOFTWARE: an illume-rt bug (the message asks for ILLUME_RT_DEBUG=1 and a report)
INTERRUPTED_EXIT = 130  # Ctrl-C


class IllumeError(Exception):
    """Base of every user-facing error: bad input, a bundle that cannot be used, a missing package or device."""


class UsageError(IllumeError):
    """A bad command line or input value."""


class OutputError(IllumeError):
    """A target that cannot be written safely (a folder that is not ours, a device, a full disk)."""
