"""The failures a user can meet and fix: each module's error class derives from ``Expected``, so that the command line
turns any of them into one sentence and an exit code (``cli.expected_errors``) without importing the module that
raised it: a config typo is reported before torch is imported."""

from __future__ import annotations


class Expected(Exception):
    """A failure caused by the input (config, options, data, files) or by the user's situation, not by a bug: its message
    names the file or key, what happened and what to do."""
