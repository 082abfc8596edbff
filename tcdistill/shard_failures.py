"""Failure accounting of the shard readers: the per-kind counts of skipped samples (with `--data_failure_patience`), and
the one-line warning that names each failing shard the first time a process sees it fail."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Iterable

logger = logging.getLogger("tcdistill")

# Kinds that fail a whole shard (or its rest): the user has to find and fix that file or url, so the shard is named.
SHARD_KINDS = ("shard_error", "stalled", "empty_shard")
SHARD_WARNINGS = 20  # failing shards named per process; past it they are only counted (1,000 bad shards: 20 lines, then a total)


class DataError(RuntimeError):
    """No usable sample arrived within `failure_patience` consecutive failures."""


class FailureTracker:
    """Counts skipped samples per kind and raises DataError once patience runs out; keeps the first failure of each shard
    (once per tracker: a loader worker or the cache's read of one shard) for `ShardFailureLog`."""

    def __init__(self, patience: int, where: str) -> None:
        self.patience, self.where = patience, where
        self.pending: Counter[str] = Counter()  # since the last yielded sample, shipped with the next
        self.streak_kinds: Counter[str] = Counter()
        self.streak_urls: dict[str, None] = {}  # ordered set
        self.streak, self.last_msg = 0, ""
        # (url, kind, reason) of shards failing for the first time here, shipped with the next sample: a loader worker
        # cannot log cleanly (its lines interleave with the trainer's), the process that trains on its batches does.
        self.new_shards: list[tuple[str, str, str]] = []
        self.named: set[str] = set()

    def fail(self, kind: str, url: str, msg: str) -> None:
        """Record one failure."""
        self.pending[kind] += 1
        self.streak_kinds[kind] += 1
        self.streak_urls[url] = None
        self.streak, self.last_msg = self.streak + 1, msg[:500]
        if kind in SHARD_KINDS and url not in self.named:
            self.named.add(url)
            self.new_shards.append((url, kind, msg[:500]))

    @property
    def exhausted(self) -> bool:
        """Whether the consecutive-failure budget is spent."""
        return self.streak >= self.patience

    def check(self) -> None:
        """Raise DataError naming shards and failure kinds if patience is exhausted."""
        if not self.exhausted:
            return
        urls = list(self.streak_urls)
        shown = ", ".join(urls[:8]) + (f" (+{len(urls) - 8} more)" if len(urls) > 8 else "")
        kinds = ", ".join(f"{k}={n}" for k, n in self.streak_kinds.most_common())
        raise DataError(
            f"{self.where}: no usable sample in {self.streak} consecutive failures "
            f"(failure_patience={self.patience}); kinds: {kinds}; shards: {shown}; "
            f"last error: {self.last_msg}"
        )

    def restart(self, kind: str) -> None:
        """Count `kind` once and start a fresh streak; the failures so far still ship with the next sample."""
        self.pending[kind] += 1
        self.streak_kinds, self.streak_urls, self.streak = Counter(), {}, 0

    def success(self) -> dict[str, int]:
        """Reset the streak and return the per-kind counts accumulated since the last success."""
        delta = dict(self.pending)
        self.pending, self.streak_kinds, self.streak_urls, self.streak = Counter(), Counter(), {}, 0
        return delta

    def take_shards(self) -> list[tuple[str, str, str]]:
        """The shards that failed for the first time since the last call, as (url, kind, reason)."""
        new, self.new_shards = self.new_shards, []
        return new


def failed_shards(samples: Iterable[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The first failures that `samples` (one batch) carry, for the batch's `failed_shards`."""
    return [f for s in samples for f in s.get("failed_shards", ())]


class ShardFailureLog:
    """Warns once per process per failing shard, naming it and why (the skip counts say only how many failed), for the
    first `limit` shards; `summary()` then says how many more failed unnamed."""

    def __init__(self, where: str = "", limit: int = SHARD_WARNINGS) -> None:
        self.where, self.limit = where, limit
        self.seen: set[str] = set()  # loader workers that share shards each report them: named once here
        self.unnamed = 0

    def report(self, failures: Iterable[tuple[str, str, str]]) -> None:
        """Warn about the shards among `failures` ((url, kind, reason)) not seen before."""
        for url, kind, reason in failures:
            if url in self.seen:
                continue
            self.seen.add(url)
            if len(self.seen) > self.limit:
                self.unnamed += 1
                continue
            more = f"; only the first {self.limit} failing shards are named, the rest counted" if len(self.seen) == self.limit else ""
            logger.warning("%sshard %s failed: %s (its samples before the failure are used; skipped samples count it as "
                           "%s each time it is read%s)", self.where, url, reason, kind, more)

    def summary(self) -> None:
        """Say how many failing shards were not named (none: nothing)."""
        if self.unnamed:
            logger.warning("%s...and %d more failing shard(s), not named (the first %d were)", self.where, self.unnamed, self.limit)
