"""Mistakes a user can make, as exception types the scripts tell apart from bugs.

A :class:`UserError` is a setting or an input that cannot work: its message is one paragraph that
names the setting and the fix, and the scripts print that paragraph alone (no traceback unless
``HYDRA_FULL_ERROR=1``). Every other exception is a bug and keeps its traceback. Each kind also
derives from the built-in exception it refines, so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["user_error", "UserError", "SettingError", "MissingInputError", "CorruptInputError", "DivergedError"]


class UserError(Exception):
    """A mistake of the user's, explained in one paragraph that names the setting and the fix."""


class SettingError(UserError, ValueError):
    """A config value or argument that is unknown, out of range or inconsistent."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the settings point to does not exist."""


class CorruptInputError(UserError, RuntimeError):
    """A file exists but cannot be read as what it should be (truncated, corrupt, of another model)."""


class DivergedError(UserError, FloatingPointError):
    """Training produced a NaN or infinite loss."""


def user_error(error: BaseException) -> UserError | None:
    """The :class:`UserError` that ``error`` is or was raised from, if any."""
    while error is not None:
        if isinstance(error, UserError):
            return error
        error = error.__cause__ or error.__context__
    return None
