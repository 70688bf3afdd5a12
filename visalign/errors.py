"""The one error class for a user's mistake.

:class:`UsageError` is what every part of visalign raises for input the user can fix (a bad
argument, a missing file, a recipe key that does not fit); its message names the input and what to
do.  The command line prints it without a traceback and exits with code 2.  It subclasses
``ValueError``, so ``except ValueError`` in calling code keeps working.  :class:`ConfigError` (a
recipe that does not fit its dataclass) is the recipe-reading kind of it.

The bottom layer: imports nothing.
"""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """A user mistake: printed without a traceback, exit code 2."""
