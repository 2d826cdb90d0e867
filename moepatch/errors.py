"""Exceptions moepatch raises; each message says what was wrong and what is accepted."""

from __future__ import annotations

import argparse


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


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors raise :class:`UsageError` with one line that names the command, instead
    of printing the usage block and exiting: every moepatch command and script parses with it."""

    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")

    def add_argument(self, *args, **kwargs):
        # argparse prints no help line, hence no default, for an option without help text.
        if kwargs.get("help") is None and kwargs.get("default") not in (None, False, argparse.SUPPRESS):
            kwargs["help"] = "(default: %(default)s)"
        return super().add_argument(*args, **kwargs)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help that shows every option's default (lists comma-joined, as typed) and keeps
    descriptions as written; an option without a default says what happens in its help."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if default in (None, False, argparse.SUPPRESS) or action.option_strings == [] or "%(default)" in text:
            return text
        if isinstance(default, (list, tuple)):
            default = ",".join(str(d) for d in default)
        return f"{text} (default: {default})".strip()
