"""Errors featx raises for usage and configuration mistakes (printed as one line by the CLI)."""
import re


class FeatxError(Exception):
    """A usage or configuration error: the CLI prints it as one line and exits 1."""


class MediaError(Exception):
    """A data error for one item (missing file, corrupt image or audio, empty text).

    The message is a one-line reason; it is recorded in the cache's `error` dataset and the batch goes on.
    """


class Advice(UserWarning):
    """A line on how a run could go faster (a package to install, a setting to change): featx extract says it
    once per run, not under -q."""


class OptionAdvice(Advice):
    """Advice that names an option of featx extract (e.g. --image-decode): a command that runs extract without
    offering that option (featx predict) leaves it unsaid."""


def first_line(err) -> str:
    """The first line of an exception's message, or its type name when the message is empty; an in-memory file's
    repr in it (Pillow names the file object it was given, with its address) is "the file", so that the reason
    recorded for an item is the same from run to run."""
    lines = str(err).strip().splitlines()
    return re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the file", lines[0]) if lines else type(err).__name__
