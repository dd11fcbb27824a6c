"""What every ``svertka`` subcommand shares: the user-facing error.

A leaf module (it imports nothing of svertka), so that the halves that
register subcommands (``service.server_cli``, ``export.cli``) and the
``svertka`` entry point (``service.cli``) can all import it without one
importing another.
"""

from __future__ import annotations


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 2, no traceback."""
