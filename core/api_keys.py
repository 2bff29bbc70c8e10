"""API keys as data: scoped, hashed, expiring, revocable, rotatable.

A key is shown once, when it is made: ``evk_<id>_<secret>``. MongoDB keeps its
id, the SHA-256 of the whole key (never the key), its scope, its accounts,
a label and its created/expires/revoked times. Every change bumps a version
number in Redis; each HTTP worker polls it (``service/keyring.py``) and
reloads, so a change reaches every worker and host within about a second.

Scopes: ``write`` adds events (a key that may sit in a web page), ``read``
reads figures, ``admin`` does both and manages keys, erasures and dead letters
for its accounts. ``*`` as the accounts means every account.

``API_KEYS`` (settings) stays a bootstrap: its keys live only in the
environment and work beside the stored ones.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from core import keys
from core.connections import Redis
from core.events import is_account_id, now_utc
from core.settings import Settings
from core.store import Database, Document

SCOPES = ("write", "read", "admin")
ALL_ACCOUNTS = "*"
PREFIX = "evk_"
# what each scope may do: admin may also read and write
PERMISSIONS: Mapping[str, frozenset[str]] = {
    "write": frozenset({"write"}),
    "read": frozenset({"read"}),
    "admin": frozenset({"admin", "read", "write"}),
    # API_KEYS entries without a scope (the bootstrap's original meaning)
    "read+write": frozenset({"read", "write"}),
}
MAX_LABEL = 200
QUOTAS = ("events_per_second", "types_per_day", "accounts_per_hour")
MAX_QUOTA = 10**9
MAX_ACCOUNTS = 1000


class KeyRequestError(ValueError):
    """A key request that cannot be carried out (unknown id, bad scope, …)."""


@dataclass(frozen=True)
class ApiKey:
    """What a key may do. ``id`` names it anywhere a key must be named (rate-limit
    keys, logs, audit records): the key itself never leaves the request."""

    id: str
    scope: str
    accounts: frozenset[str]
    label: str = ""
    created_at: datetime | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    hash: str = ""
    bootstrap: bool = False
    # this key's own per-account limits (service/quotas.py), replacing the settings
    quotas: Mapping[str, int] = field(default_factory=dict)
    permissions: frozenset[str] = field(default=frozenset(), compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "permissions", PERMISSIONS[self.scope])

    def active(self, now: datetime) -> bool:
        if self.revoked_at is not None and self.revoked_at <= now:
            return False
        return self.expires_at is None or now < self.expires_at

    def may(self, permission: str, account_id: str) -> bool:
        if permission not in self.permissions:
            return False
        return ALL_ACCOUNTS in self.accounts or account_id in self.accounts

    def covers(self, accounts: Iterable[str]) -> bool:
        """Whether every one of ``accounts`` is among this key's."""
        return ALL_ACCOUNTS in self.accounts or all(a in self.accounts for a in accounts)

    @property
    def single_account(self) -> str | None:
        """The one account a write key in an SDK stands for, if it has exactly one."""
        if len(self.accounts) == 1 and ALL_ACCOUNTS not in self.accounts:
            return next(iter(self.accounts))
        return None

    def public(self) -> dict[str, Any]:
        """What listing a key shows: everything but its hash."""
        return {
            "id": self.id,
            "scope": self.scope,
            "accounts": sorted(self.accounts),
            "label": self.label,
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at),
            "revoked_at": _iso(self.revoked_at),
            "quotas": dict(self.quotas),
        }


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat().replace("+00:00", "Z") if ts else None


def digest(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


def same_digest(a: str, b: str) -> bool:
    return hmac.compare_digest(a, b)


def bootstrap_id(raw: str) -> str:
    """A stable name for an ``API_KEYS`` key that does not reveal it."""
    return "env_" + digest(raw)[:12]


def bootstrap_keys(entries: Mapping[str, tuple[str, frozenset[str]]]) -> dict[str, ApiKey]:
    """``API_KEYS`` as keys, by digest."""
    out = {}
    for raw, (scope, accounts) in entries.items():
        key = ApiKey(bootstrap_id(raw), scope, accounts, label="API_KEYS", bootstrap=True,
                     hash=digest(raw))  # fmt: skip
        out[key.hash] = key
    return out


def check_quotas(quotas: Mapping[str, int]) -> dict[str, int]:
    unknown = sorted(set(quotas) - set(QUOTAS))
    if unknown:
        raise KeyRequestError(f"unknown quotas {unknown}: use {', '.join(QUOTAS)}")
    for name, value in quotas.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_QUOTA:
            raise KeyRequestError(f"quota {name} must be a whole number 0..{MAX_QUOTA} (0: off)")
    return dict(quotas)


def check_request(scope: str, accounts: Iterable[str], label: str = "") -> frozenset[str]:
    """The accounts of a key to be made, or why it cannot be."""
    if scope not in SCOPES:
        raise KeyRequestError(f"scope must be one of {', '.join(SCOPES)} (got {scope!r})")
    wanted = frozenset(accounts)
    if not wanted:
        raise KeyRequestError("a key needs at least one account (or * for every account)")
    if len(wanted) > MAX_ACCOUNTS:
        raise KeyRequestError(f"a key may name at most {MAX_ACCOUNTS} accounts")
    bad = sorted(a for a in wanted if a != ALL_ACCOUNTS and not is_account_id(a))
    if bad:
        raise KeyRequestError(f"not account ids (1..64 of A-Z a-z 0-9 _ . : -): {bad[:5]}")
    if len(label) > MAX_LABEL:
        raise KeyRequestError(f"the label may be at most {MAX_LABEL} characters")
    return wanted


def new_key() -> tuple[str, str]:
    """(id, the key): 12 hex characters, and 43 URL-safe random characters after them."""
    key_id = secrets.token_hex(6)
    return key_id, f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def from_document(doc: Document) -> ApiKey:
    return ApiKey(
        id=doc["_id"],
        scope=doc["scope"],
        accounts=frozenset(doc["accounts"]),
        label=doc.get("label", ""),
        created_at=doc.get("created_at"),
        expires_at=doc.get("expires_at"),
        revoked_at=doc.get("revoked_at"),
        hash=doc["hash"],
        quotas=doc.get("quotas") or {},
    )


async def changed(redis: Redis, settings: Settings) -> None:
    """Tell every worker to reload (they poll this number)."""
    await redis.incr(keys.api_keys_version(settings))


async def version(redis: Redis, settings: Settings) -> int:
    return int(await redis.get(keys.api_keys_version(settings)) or 0)


async def create(
    db: Database,
    redis: Redis,
    settings: Settings,
    scope: str,
    accounts: Iterable[str],
    label: str = "",
    expires_at: datetime | None = None,
    quotas: Mapping[str, int] | None = None,
) -> tuple[ApiKey, str]:
    """Make a key; returns it with the key itself, which is never seen again."""
    wanted = check_request(scope, accounts, label)
    limits = check_quotas(quotas or {})
    now = now_utc()
    if expires_at is not None and expires_at <= now:
        raise KeyRequestError("expires_at must be in the future")
    key_id, raw = new_key()
    doc: Document = {"_id": key_id, "hash": digest(raw), "scope": scope,
                     "accounts": sorted(wanted), "label": label, "created_at": now,
                     "expires_at": expires_at, "revoked_at": None,
                     "quotas": limits}  # fmt: skip
    await ensure_indexes(db)
    await db[keys.API_KEYS].insert_one(doc)
    await changed(redis, settings)
    return from_document(doc), raw


async def load_all(db: Database) -> list[ApiKey]:
    return [from_document(d) async for d in db[keys.API_KEYS].find({})]


async def get(db: Database, key_id: str) -> ApiKey:
    doc = await db[keys.API_KEYS].find_one({"_id": key_id})
    if doc is None:
        raise KeyRequestError(f"no key with id {key_id!r}")
    return from_document(doc)


async def listed(db: Database, account: str | None = None) -> list[ApiKey]:
    query: Document = {"accounts": account} if account else {}
    found = [from_document(d) async for d in db[keys.API_KEYS].find(query)]
    return sorted(found, key=lambda k: (k.created_at or now_utc(), k.id))


async def revoke(
    db: Database, redis: Redis, settings: Settings, key_id: str, at: datetime | None = None
) -> ApiKey:
    """Revoke a key now (or at ``at``, which rotation uses); revoking twice keeps the first."""
    key = await get(db, key_id)
    when = at or now_utc()
    if key.revoked_at is None or when < key.revoked_at:
        await db[keys.API_KEYS].update_one({"_id": key_id}, {"$set": {"revoked_at": when}})
        await changed(redis, settings)
    return await get(db, key_id)


async def rotate(
    db: Database, redis: Redis, settings: Settings, key_id: str, old_valid_for: timedelta
) -> tuple[ApiKey, str, ApiKey]:
    """A new key with the old one's scope, accounts and label; the old one stays valid
    for ``old_valid_for`` (so clients can move), then is revoked."""
    old = await get(db, key_id)
    if old.revoked_at is not None and old.revoked_at <= now_utc():
        raise KeyRequestError(f"key {key_id} is revoked: create a new one instead")
    if old_valid_for < timedelta(0):
        raise KeyRequestError("the old key's overlap may not be negative")
    new, raw = await create(db, redis, settings, old.scope, old.accounts, old.label,
                            old.expires_at if old.expires_at and old.expires_at > now_utc()
                            else None, old.quotas)  # fmt: skip
    old = await revoke(db, redis, settings, key_id, now_utc() + old_valid_for)
    return new, raw, old


async def ensure_indexes(db: Database) -> None:
    await db[keys.API_KEYS].create_index("hash", unique=True)
