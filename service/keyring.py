"""The API keys an HTTP worker knows: ``API_KEYS`` and every stored key, by digest.

Looking a key up costs a SHA-256 and a dict lookup, never a store round trip.
The worker asks Redis every ``KEYS_REFRESH_SECONDS`` whether the stored keys
changed (one GET of a version number ``core/api_keys.py`` bumps) and reloads
them when they did, so a new, revoked or rotated key takes effect on every
worker of every host within about a second. Expiry is checked at each lookup.
"""

from __future__ import annotations

import asyncio
import logging

from pymongo.errors import PyMongoError

from core import api_keys, tasks
from core.api_keys import ApiKey
from core.connections import REDIS_ERRORS, Redis
from core.settings import Settings
from core.store import Database

log = logging.getLogger(__name__)


class KeyRing:
    def __init__(self, settings: Settings, db: Database, redis: Redis) -> None:
        self._settings = settings
        self._db = db
        self._redis = redis
        self._bootstrap = api_keys.bootstrap_keys(settings.api_keys)
        self._stored: dict[str, ApiKey] = {}
        self._version: int | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def loaded(self) -> bool:
        """Whether the stored keys were read at least once (until then only API_KEYS work)."""
        return self._version is not None

    def find(self, raw: str) -> ApiKey | None:
        digest = api_keys.digest(raw)
        return self._bootstrap.get(digest) or self._stored.get(digest)

    async def refresh(self) -> bool:
        """Reload the stored keys if they changed; whether they did."""
        current = await api_keys.version(self._redis, self._settings)
        if current == self._version:
            return False
        # read after the version: a change in between is reloaded on the next poll
        stored = await api_keys.load_all(self._db)
        self._stored = {key.hash: key for key in stored}
        self._version = current
        return True

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._poll())

    async def stop(self) -> None:
        if self._task:
            await tasks.stop([self._task])

    async def _poll(self) -> None:
        failing = False
        while True:
            try:
                if await self.refresh():
                    log.info("API keys reloaded: %d stored", len(self._stored))
                failing = False
            except (PyMongoError, *REDIS_ERRORS) as exc:
                if not failing:  # once per outage, not once per poll
                    log.warning("cannot reload API keys (%s); keeping the ones known", exc)
                failing = True
            await asyncio.sleep(self._settings.keys_refresh_seconds)
