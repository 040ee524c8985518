"""The one error type for user-facing failures.

A ``UserError`` is a failure the user can fix: bad input, a setting that contradicts the run
directory, a corrupt or missing artifact. Its message is one line naming the file, the record or
stage, and the fix; the CLI prints it as is (no traceback unless ``-v``). Anything else that
escapes is a bug. It subclasses ``ValueError`` so callers that already catch bad values keep
working.
"""

from __future__ import annotations


class UserError(ValueError):
    """A failure the user can fix; the message names the file, the record/stage and the fix."""


class ConfigError(UserError):
    """A configuration value (``config.json``, ``--set``, ``--variant``) that embrag cannot use."""
