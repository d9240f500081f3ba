"""User-facing errors: one line that says what and where.

The CLI prints ``str(err)`` of any :class:`PxError` and exits with ``err.exit_code``; anything
else is a bug in pxcompile and keeps its traceback.
"""

from __future__ import annotations


class PxError(Exception):
    """A mistake in the user's input (flags, files, models, plans). Exit code 2."""

    exit_code = 2


class SchemaError(PxError):
    """A model schema file or object is malformed."""


class PlanError(PxError):
    """A plan is malformed or does not fit the model it is applied to."""


class PolicyError(PxError):
    """A policy file or override is malformed."""


class BudgetNotAttainable(PxError):
    """The budget cannot be met (raised only with ``strict=True``). Exit code 3: the input
    was valid, the goal was not reached."""

    exit_code = 3


class TraceError(PxError):
    """A model could not be traced into a schema."""


class ModelFileError(PxError):
    """A model file could not be loaded or does not define what the command needs."""
