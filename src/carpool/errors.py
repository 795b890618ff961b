"""The small exception family raised at carpool's API edge.

Invariants inside the engine are plain ``assert`` statements with the offending value; these
classes are what a *caller* can catch and act on.
"""

from __future__ import annotations


class CarpoolError(Exception):
    """Base class of every error carpool raises on purpose."""


class ModelLoadError(CarpoolError):
    """A model file is missing, unsupported, truncated or inconsistent.

    The message always names the file (or directory) and what is wrong with it.
    """


class InvalidRequestError(CarpoolError, ValueError):
    """A request that can never be served as given (bad parameters, prompt too long...).

    Subclasses ``ValueError`` so that plain-Python callers catching ``ValueError`` see it too.
    """


class EngineDeadError(CarpoolError):
    """The engine loop failed and cannot serve further requests."""
