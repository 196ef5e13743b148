"""Where Keel's PostgreSQL is: the configured server, or the embedded one under the data directory."""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.ext.asyncio import AsyncEngine

from keel.db.embedded import EmbeddedPostgres
from keel.db.engine import create_engine
from keel.db.migrate import upgrade
from keel.settings import Settings

log = logging.getLogger(__name__)


class Database:
    """Opens the engine (starting or joining the embedded server if no URL is set) and closes it."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._embedded: EmbeddedPostgres | None = None
        self.url = ""
        self._engine: AsyncEngine | None = None

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("Database.open() has not run")
        return self._engine

    @property
    def embedded(self) -> bool:
        return self._embedded is not None

    async def open(self, *, migrate: bool = True) -> AsyncEngine:
        if self._settings.database_url is not None:
            self.url = self._settings.database_url.get_secret_value()
        else:
            self._embedded = EmbeddedPostgres(self._settings.data_dir)
            self.url = await asyncio.to_thread(self._embedded.start)
            log.info("embedded PostgreSQL ready under %s", self._embedded.pgdata)
        if migrate:
            await upgrade(self.url)
        self._engine = create_engine(self.url)
        return self._engine

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.stop)
            self._embedded = None
