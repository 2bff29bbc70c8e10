"""Logging, configured once per process, the same way in every process.

Every module logs through ``logging.getLogger(__name__)``; each process's entry
point calls :func:`configure_logging` with its role, so a line from any module
in any process has one format and says which process wrote it.
"""

from __future__ import annotations

import logging
import logging.config

FORMAT = "%(asctime)s %(levelname)s [%(role)s %(process)d] %(name)s: %(message)s"
OUR_PACKAGES = ("core", "service", "rollups", "scripts")


class _RoleFilter(logging.Filter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        return True


def configure_logging(role: str, level: str = "INFO") -> None:
    """Send our packages' records to stderr, formatted, naming ``role``."""
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "filters": {"role": {"()": _RoleFilter, "role": role}},
            "formatters": {"plain": {"format": FORMAT}},
            "handlers": {
                "stderr": {
                    "class": "logging.StreamHandler",
                    "stream": "ext://sys.stderr",
                    "formatter": "plain",
                    "filters": ["role"],
                }
            },
            "loggers": {
                name: {"handlers": ["stderr"], "level": level.upper(), "propagate": False}
                for name in OUR_PACKAGES
            },
        }
    )
