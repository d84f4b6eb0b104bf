"""User errors: one clear message and exit code 2. Anything else is a bug (traceback, exit 1)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A mistake the user can fix. `problems` are reported together, one line each."""

    def __init__(self, headline: str, problems: Iterable[str] = ()):
        self.headline = headline
        self.problems = list(problems)
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join([self.headline, *(f"  - {p}" for p in self.problems)])


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' Did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{match[0]}'?" if match else ""
