"""Where a config puts things, and values derived from it: the admin socket, the usage database, the usage time zone.
Relative paths resolve against the config file's folder."""

from __future__ import annotations

import datetime
import zoneinfo
from pathlib import Path

from queuegate.config.schema import Config


def admin_socket_path(config: Config) -> Path:
    """Where the daemon's admin socket is: `[server].admin_socket`, else <state_dir>/admin.sock; relative paths
    resolve against the config file's folder."""
    base = Path(config.base_dir)
    if config.server.admin_socket:
        return base / config.server.admin_socket
    return base / config.server.state_dir / "admin.sock"


def usage_timezone(config: Config) -> datetime.tzinfo:
    """The time zone usage days are counted in (`[usage].timezone`)."""
    name = config.usage.timezone
    return datetime.UTC if name == "UTC" else zoneinfo.ZoneInfo(name)


def usage_db_path(config: Config) -> Path:
    """Where the usage database is: `[usage].path`, else <state_dir>/usage.sqlite3 (relative to the config file)."""
    base = Path(config.base_dir)
    if config.usage.path:
        return base / config.usage.path
    return base / config.server.state_dir / "usage.sqlite3"


def memory_db_path(config: Config) -> Path:
    """Where the built-in memory store is: `[memory].path`, else <state_dir>/memory.sqlite3."""
    base = Path(config.base_dir)
    if config.memory.path:
        return base / config.memory.path
    return base / config.server.state_dir / "memory.sqlite3"


def batches_path(config: Config) -> Path:
    """Where batch jobs live (their database and files): <state_dir>/batches."""
    return Path(config.base_dir) / config.server.state_dir / "batches"
