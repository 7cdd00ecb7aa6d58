"""User-facing errors.

An ``MDError`` is a mistake in the user's input (a missing folder, a bad flag value, a file from
another model). Command-line entry points print it as one line and exit non-zero, with no
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import warnings
from pathlib import Path

_PACKAGE = str(Path(__file__).resolve().parent)
_python_format = warnings.formatwarning


class MDError(Exception):
    """A user error: printed as one readable line by the command-line tools."""


class ConfigError(MDError):
    """A bad config key, flag or value."""


class DataError(MDError):
    """Missing or malformed data on disk."""


def format_warning(message, category, filename, lineno, line=None) -> str:
    """Format a warning that md_plugin raised as one ``warning: ...`` line.

    Python prints a warning as two lines (location, then the source line), which reads like a
    crash to a user. Our own warnings are messages to the user, so the command-line entry
    points print them as one line, like an error; warnings from other packages keep Python's
    format (their location is useful to whoever reports them).

    Args:
        message, category, filename, lineno, line: As :func:`warnings.formatwarning` takes them.

    Returns:
        The text to print.
    """
    if str(Path(filename).resolve()).startswith(_PACKAGE):
        return f"warning: {' '.join(str(message).split())}\n"
    return _python_format(message, category, filename, lineno, line)
