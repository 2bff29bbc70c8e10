"""A window's figures: what /summary answers, and how an aggregate, the buckets that
left the window and the live tail combine into them exactly.

Pure maths over ``core/buckets.py``'s counts; reading the documents and the tail
is the caller's (``service/summary.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.buckets import TOP_KEPT, Counts, Packed, to_datetime, top_users

MAX_TOP = TOP_KEPT  # the API's largest `top`: every aggregate keeps its top 100


def iso(epoch_ms: int) -> str:
    """An instant as the API writes it: UTC, milliseconds, ``Z``."""
    return to_datetime(epoch_ms).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Reads:
    """What computing one answer read: store documents, tail events, attempts."""

    documents: int = 0
    tail_events: int = 0
    attempts: int = 1


@dataclass
class Figures:
    """A window's exact figures, with users unpacked only as far as needed."""

    account_id: str
    window: str
    start: int
    to: int
    total: int = 0
    types: dict[str, int] = field(default_factory=dict)
    unique_users: int = 0
    top: list[tuple[str, int]] = field(default_factory=list)
    reads: Reads = field(default_factory=Reads)

    def body(self, top: int) -> dict[str, Any]:
        return {
            "account_id": self.account_id,
            "window": self.window,
            "from": iso(self.start),
            "to": iso(self.to),
            "total": self.total,
            "totals": dict(sorted(self.types.items())),
            "unique_users": self.unique_users,
            "top_users": [{"user_id": u, "events": n} for u, n in self.top[:top]],
            "as_of": iso(self.to),
        }


def combine(figures: Figures, base: Packed, extra: Counts, left: Counts) -> None:
    """The aggregate, minus the buckets that left, plus the tail."""
    figures.total = base.total - left.total + extra.total
    types = dict(base.types)
    for t, n in left.types.items():
        types[t] -= n
    for t, n in extra.types.items():
        types[t] = types.get(t, 0) + n
    figures.types = {t: n for t, n in types.items() if n}
    if not extra.users and not left.users:
        figures.unique_users, figures.top = base.unique_users, base.top
        return
    # only the users the tail or the left buckets touch change: look them up in
    # the aggregate's user counts (built once per kept document) and rank them
    # with its top 100 instead of ranking every user
    index = base.index()
    candidates = dict(base.top)
    unique = base.unique_users
    for user in set(extra.users) | set(left.users):
        before = index.get(user, 0)
        after = before - left.users.get(user, 0) + extra.users.get(user, 0)
        unique += (after > 0) - (before > 0)
        if after:
            candidates[user] = after
        else:
            candidates.pop(user, None)
    figures.unique_users = unique
    if base.unique_users > len(base.top) and _top_may_be_elsewhere(base, candidates):
        users = dict(index)
        for user, n in candidates.items():
            users[user] = n
        for user in left.users:
            if user not in candidates:
                users.pop(user, None)
        candidates = users
    figures.top = top_users(candidates, MAX_TOP)


def _top_may_be_elsewhere(base: Packed, candidates: dict[str, int]) -> bool:
    """Whether a user outside the candidates could now be among the top 100.

    Every other user ranks behind the aggregate's 100th; while at least 100
    candidates still rank at or ahead of it, none of them can get in.
    """
    last_user, last_n = base.top[-1]
    ahead = sum(1 for u, n in candidates.items() if (-n, u) <= (-last_n, last_user))
    return ahead < MAX_TOP
