"""The one exception the library raises for problems a user can fix."""

from __future__ import annotations


class LowRankError(Exception):
    """A model-wide or input problem, described in one sentence (the CLI prints it and exits 2)."""
