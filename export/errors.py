"""Errors of the training/export stage that a user can fix (bad paths, names, files).

The CLI prints them as one line without a traceback; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class ExportError(Exception):
    """A user-fixable failure in train/export/quantize/inspect."""


class VerificationError(ExportError):
    """The exported model does not compute what the torch model computes."""


class AccuracyGateError(ExportError):
    """The int8 (or fp16) model lost more accuracy than allowed; nothing was written."""
