"""Bad-input accounting: a bad sample is a counted, logged skip, never an exception out of the
dataloader, until too large a share of the data is bad.

Datasets raise `BadSample(kind, path, detail)` deep inside; the dataset's `__getitem__` catches
it, records it in its `SkipLedger`, and replaces the sample with the next good one (so every rank
still gets the same number of samples per step). The ledger warns once per kind, keeps the worst
files, and raises `TooManyBadSamples` naming the worst file when the bad share exceeds the limit.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class BadSample(Exception):
    """One sample cannot be used. kind: a short stable tag ('truncated-video', 'missing-field', ...)."""

    def __init__(self, kind: str, path: str, detail: str):
        super().__init__(f"{kind}: {path}: {detail}")
        self.kind, self.path, self.detail = kind, str(path), detail


class TooManyBadSamples(RuntimeError):
    """More than the allowed share of the samples looked at were bad."""


@dataclass
class SkipLedger:
    """Counts attempts and skips for one dataset copy (one per dataloader worker)."""

    max_bad_fraction: float = 0.2
    """Stop once more than this share of the samples looked at is bad..."""
    min_attempts: int = 20
    """...but only after this many samples were looked at (a few bad ones early prove nothing)."""
    attempts: int = 0
    by_kind: Counter = field(default_factory=Counter)
    by_path: Counter = field(default_factory=Counter)
    last_detail: dict = field(default_factory=dict)

    @property
    def bad(self) -> int:
        return sum(self.by_kind.values())

    def ok(self) -> None:
        self.attempts += 1

    def record(self, err: BadSample) -> None:
        self.attempts += 1
        if self.by_kind[err.kind] == 0:
            log.warning("skipping bad sample (%s) %s: %s — further '%s' skips are counted, not logged",
                        err.kind, err.path, err.detail, err.kind)
        self.by_kind[err.kind] += 1
        self.by_path[err.path] += 1
        self.last_detail[err.path] = f"{err.kind}: {err.detail}"
        if self.attempts >= self.min_attempts and self.bad > self.max_bad_fraction * self.attempts:
            worst, n = self.by_path.most_common(1)[0]
            raise TooManyBadSamples(
                f"{self.bad} of {self.attempts} samples were bad (limit {self.max_bad_fraction:.0%}); "
                f"worst file: {worst} ({n} failures, last: {self.last_detail[worst]}); by kind: {dict(self.by_kind)}")

    def summary(self) -> str:
        if not self.bad:
            return f"{self.attempts} samples read, none skipped"
        kinds = ", ".join(f"{k}: {v}" for k, v in self.by_kind.most_common())
        return f"{self.bad} of {self.attempts} samples skipped ({kinds})"
