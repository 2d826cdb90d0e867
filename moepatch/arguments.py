"""Command-line parsing shared by ``moepatch``'s commands, the expert-parallel launcher and the scripts:
one-line errors, every default in --help, and the argument types they have in common."""

from __future__ import annotations

import argparse

from .errors import UsageError


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


def capacity_factor(text: str) -> float | None:
    """A capacity factor γ on the command line: a number, or ``none``/``inf`` for no capacity
    (``moepatch.apply`` validates the value itself)."""
    if text.lower() in ("none", "inf"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"capacity factor {text!r} is not a number (or 'none')") from None
