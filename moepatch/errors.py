"""Exceptions moepatch raises; each message says what was wrong and what is accepted."""

from __future__ import annotations


class MoePatchError(Exception):
    """Base class of every moepatch error."""


class InvalidOptionError(MoePatchError, ValueError):
    """A capacity factor, strategy, policy or option that moepatch does not accept."""


class UnsupportedModelError(MoePatchError, TypeError):
    """A model whose family moepatch cannot patch."""


class ModelStateError(MoePatchError, RuntimeError):
    """A model that cannot be patched in its current state (meta device, not patched, ...)."""


class UsageError(MoePatchError, ValueError):
    """A bad command line (an option's value, a missing file); the CLI prints it as one line, exit status 2."""
