"""Settings: environment, then CLI flags, into one frozen object that the rest of Conduit reads."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from conduit.errors import ConfigError

SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    """The user's own: `$XDG_DATA_HOME`, else `~/.local/share`. Root without XDG_DATA_HOME gets
    /var/lib, since its server runs as a user of its own that cannot enter /root."""
    env = os.environ if env is None else env
    if env.get("XDG_DATA_HOME"):
        return Path(env["XDG_DATA_HOME"]) / "conduit" / "pgdata"
    if os.geteuid() == 0:
        return Path("/var/lib/conduit/pgdata")
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    return home / ".local" / "share" / "conduit" / "pgdata"


@dataclass(frozen=True)
class Settings:
    """Everything Conduit is configured by; `dsn=None` means the embedded PostgreSQL."""

    dsn: str | None = None
    data_dir: Path = Path()
    schema: str = "conduit"
    max_payload_bytes: int = 1024 * 1024

    def __post_init__(self) -> None:
        if not SCHEMA_NAME.match(self.schema):
            raise ConfigError(
                f"schema name {self.schema!r} is not valid: use 1-63 lowercase letters, digits or _"
            )
        if self.max_payload_bytes < 1:
            raise ConfigError(f"max payload must be at least 1 byte, got {self.max_payload_bytes}")

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **flags: Any) -> Settings:
        """Read CONDUIT_* variables, then let flags that were given (not None) override them."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {"data_dir": default_data_dir(env)}
        for field in fields(cls):
            raw = env.get(f"CONDUIT_{field.name.upper()}")
            if raw:
                values[field.name] = _parse(field.name, raw)
        settings = cls(**values)
        given = {name: value for name, value in flags.items() if value is not None}
        return replace(settings, **given) if given else settings


def _parse(name: str, raw: str) -> Any:
    if name == "data_dir":
        return Path(raw).expanduser()
    if name == "max_payload_bytes":
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"CONDUIT_MAX_PAYLOAD_BYTES must be a whole number, got {raw!r}") from None
    return raw
