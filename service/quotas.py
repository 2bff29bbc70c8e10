"""Per-account quotas, so that one account cannot crowd out the others.

Each limit is a setting, and a key may carry its own values (``quotas`` on the
key, ``scripts/keys.py create --quota events_per_second=5000``), which replace
the setting for what that key writes:

- ``events_per_second`` (``ACCOUNT_EVENTS_PER_SECOND``): events an account may
  add per second, whoever sends them; past it, 429 with ``Retry-After``.
- ``types_per_day`` (``ACCOUNT_TYPES_PER_DAY``): distinct event types an account
  may use per UTC day; an event of a new type past it is refused with a 403
  naming the limit (not folded into another type: nothing is stored under a
  name the client did not send), whatever key sends it.
- ``accounts_per_hour`` (``KEY_ACCOUNTS_PER_HOUR``): distinct accounts a key
  that may write several may write to per hour (and so create); past it, 429
  with ``Retry-After`` until the next hour.

The checks run in Redis in the same script call as the enqueue
(``service/queue.py``): a refused batch adds to no count, and an admitted one
is counted once. Counts live beside the stream partition (a Redis Cluster hash
tag), so with ``STREAM_PARTITIONS`` > 1 an account whose batches go to several
partitions (mixed-account batches go to their first event's) is counted per
partition. Each worker remembers the types it already saw admitted today per
account, and sends only new ones to check.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from core.api_keys import ApiKey
from core.events import Event
from core.keys import Partition
from core.settings import Settings
from service.errors import ApiError, QuotaExceeded, RateLimited

COUNTER, SET = 1, 2
# outcome codes of the enqueue script (1 queued, -1 queue full)
CLIENT_RATE, ACCOUNT_RATE, ACCOUNT_TYPES, KEY_ACCOUNTS = -2, -3, -4, -5
DAY, HOUR = 86_400, 3_600
KNOWN_TYPES = 200_000  # types a worker remembers as admitted today, over every account


@dataclass(frozen=True)
class Check:
    """One limit an entry must stay within, checked (and counted) by the enqueue script."""

    kind: int  # COUNTER: ``add`` to a per-period count; SET: ``members`` into a set
    key: str
    limit: int
    ttl: int
    code: int
    subject: str  # the account or key it limits, for the answer
    add: int = 0
    members: tuple[str, ...] = ()

    def args(self, key_index: int) -> list[int | str]:
        head: list[int | str] = [self.kind, key_index, self.limit, self.ttl, self.code]
        if self.kind == COUNTER:
            return [*head, self.add]
        return [*head, len(self.members), *self.members]


class Quotas:
    """What one batch asks of the limits, per worker."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        # (account, day) -> types admitted that day: a plain dict, emptied whole when
        # it holds KNOWN_TYPES (then types are checked with Redis again, which is
        # right, only slower): cheaper per request than an LRU's bookkeeping
        self._known: dict[tuple[str, int], set[str]] = {}
        self._remembered = 0

    def limit(self, key: ApiKey | None, name: str, setting: int) -> int:
        if key is not None and name in key.quotas:
            return key.quotas[name]
        return setting

    def checks(
        self, part: Partition, key: ApiKey | None, client_id: str, events: list[Event]
    ) -> list[Check]:
        s = self._settings
        rate = self.limit(key, "events_per_second", s.account_events_per_second)
        types = self.limit(key, "types_per_day", s.account_types_per_day)
        accounts = self.limit(key, "accounts_per_hour", s.key_accounts_per_hour)
        if not (s.rate_limit_events_per_second or rate or types or accounts):
            return []
        now = int(time.time())
        out: list[Check] = []
        if s.rate_limit_events_per_second:
            out.append(Check(COUNTER, part.rate(client_id, now), s.rate_limit_events_per_second,
                             2, CLIENT_RATE, client_id, add=len(events)))  # fmt: skip
        first = events[0].account_id
        if all(e.account_id == first for e in events):  # the usual case: one account
            per_account = {first: events}
        else:
            per_account = {}
            for event in events:
                per_account.setdefault(event.account_id, []).append(event)
        day = now // DAY
        known_types = self._known
        for account, mine in per_account.items():
            if rate:
                out.append(Check(COUNTER, part.account_rate(account, now), rate, 2,
                                 ACCOUNT_RATE, account, add=len(mine)))  # fmt: skip
            if types:
                known = known_types.get((account, day), ())
                new = {e.type for e in mine if e.type not in known}
                if new:
                    out.append(Check(SET, part.account_types(account, day), types, 2 * DAY,
                                     ACCOUNT_TYPES, account, members=tuple(new)))  # fmt: skip
        if accounts and key is not None and key.single_account is None:
            out.append(Check(SET, part.key_accounts(key.id, now // HOUR), accounts, 2 * HOUR,
                             KEY_ACCOUNTS, key.id, members=tuple(per_account)))  # fmt: skip
        return out

    def admitted(self, checks: Iterable[Check]) -> None:
        """Remember the types a queued batch used today: they need no check again."""
        day = int(time.time()) // DAY
        for check in checks:
            if check.code != ACCOUNT_TYPES:
                continue
            if self._remembered >= KNOWN_TYPES:
                self._known.clear()
                self._remembered = 0
            known = self._known.setdefault((check.subject, day), set())
            before = len(known)
            known.update(check.members)
            self._remembered += len(known) - before


def refusal(check: Check, retry_after: int) -> ApiError:
    """The answer for a batch ``check`` refused."""
    if check.code == CLIENT_RATE:
        return RateLimited(f"more than {check.limit} events/s for this client", retry_after)
    if check.code == ACCOUNT_RATE:
        return RateLimited(f"account {check.subject} may add at most {check.limit} events per "
                           "second (its quota); retry later", retry_after, account=check.subject,
                           quota="events_per_second", limit=check.limit)  # fmt: skip
    if check.code == ACCOUNT_TYPES:
        return QuotaExceeded(
            f"account {check.subject} has used its {check.limit} distinct event types of today "
            f"(UTC): events of a new type are refused until tomorrow; new here: "
            f"{', '.join(check.members[:10])}",
            account=check.subject, quota="types_per_day", limit=check.limit,
        )  # fmt: skip
    next_hour = HOUR - int(time.time()) % HOUR
    return RateLimited(f"this key may write to at most {check.limit} accounts per hour (its "
                       "quota); retry next hour", next_hour, quota="accounts_per_hour",
                       limit=check.limit)  # fmt: skip
