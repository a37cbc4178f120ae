"""The one base class of the errors a person fixes by changing the command line or its inputs.

The ``igpt`` entry point (``igpt.cli.run``) reports a ``UserError`` as one line, ``igpt COMMAND: error: …``,
with exit code 2 and no traceback. It is a ``ValueError`` so that callers that caught ``ValueError`` before
keep working. This module imports nothing of the project: every stage may raise its errors.
"""
from __future__ import annotations


class UserError(ValueError):
    """A bad config key or value, input that does not fit, a download that failed: fixable by the user."""
