"""User-facing errors.

An ``MDError`` is a mistake in the user's input (a missing folder, a bad flag value, a file from
another model). Command-line entry points print it as one line and exit non-zero, with no
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MDError(Exception):
    """A user error: printed as one readable line by the command-line tools."""


class ConfigError(MDError):
    """A bad config key, flag or value."""


class DataError(MDError):
    """Missing or malformed data on disk."""
