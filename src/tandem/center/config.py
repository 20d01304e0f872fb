"""Configuration: a TOML file, then environment overrides.

    [database]
    dsn_file = "/etc/tandem/center.dsn"   # libpq DSN/URI in a file (0600): no password on a command line
    pool_min = 1
    pool_max = 8

    [server]
    bind = "127.0.0.1"                    # or unix_socket = "/run/tandem/center.sock"
    port = 8480
    tls_cert = "/etc/tandem/pki/center.crt"
    tls_key = "/etc/tandem/pki/center.key"
    tls_client_ca = "/etc/tandem/pki/ca.crt"  # verify client certificates against this CA
    tls_require_client_cert = true            # mutual TLS (needs tls_client_ca)

    [api]
    max_body_bytes = 1048576

Environment: TANDEM_CENTER_CONFIG (the file), TANDEM_CENTER_DSN_FILE, TANDEM_CENTER_DSN (a DSN
without a password; libpq also reads PGPASSFILE), TANDEM_CENTER_BIND, TANDEM_CENTER_PORT.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

DEFAULT_CONFIG = "/etc/tandem/center.toml"


class ConfigError(ValueError):
    pass


@dataclass
class DatabaseConfig:
    dsn: str = ""
    dsn_file: str = ""
    pool_min: int = 1
    pool_max: int = 8

    def conninfo(self) -> str:
        if self.dsn_file:
            try:
                text = Path(self.dsn_file).read_text(encoding="utf-8").strip()
            except OSError as e:
                raise ConfigError(f"cannot read the DSN file {self.dsn_file}: {e.strerror}") from None
            if not text:
                raise ConfigError(f"the DSN file {self.dsn_file} is empty")
            return text
        if self.dsn:
            return self.dsn
        raise ConfigError("no database: set database.dsn_file (or TANDEM_CENTER_DSN_FILE)")


@dataclass
class ServerConfig:
    bind: str = "127.0.0.1"
    port: int = 8480
    unix_socket: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    tls_require_client_cert: bool = False


@dataclass
class ApiConfig:
    max_body_bytes: int = 1 << 20


@dataclass
class Config:
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    api: ApiConfig = field(default_factory=ApiConfig)

    def validate(self) -> Config:
        s = self.server
        if bool(s.tls_cert) != bool(s.tls_key):
            raise ConfigError("server.tls_cert and server.tls_key go together")
        if s.tls_require_client_cert and not (s.tls_client_ca and s.tls_cert):
            raise ConfigError("server.tls_require_client_cert needs tls_cert, tls_key and tls_client_ca")
        if not 0 < s.port < 65536:
            raise ConfigError(f"server.port {s.port} is out of range")
        if not 1 <= self.database.pool_min <= self.database.pool_max:
            raise ConfigError("need 1 <= database.pool_min <= database.pool_max")
        if self.api.max_body_bytes < 1024:
            raise ConfigError("api.max_body_bytes must be at least 1024")
        return self


def _section(cls, raw: dict, name: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"[{name}]: unknown key(s) {', '.join(unknown)}")
    obj = cls()
    for key, value in raw.items():
        want = type(getattr(obj, key))
        if type(value) is not want:
            raise ConfigError(f"[{name}] {key}: expected {want.__name__}, got {type(value).__name__}")
        setattr(obj, key, value)
    return obj


def load(path: str | None = None, env: dict[str, str] | None = None) -> Config:
    """The config from `path` (or $TANDEM_CENTER_CONFIG, or the default file if it exists)."""
    env = os.environ if env is None else env
    if not path:
        path = env.get("TANDEM_CENTER_CONFIG") or (DEFAULT_CONFIG if Path(DEFAULT_CONFIG).exists() else "")
    raw: dict = {}
    if path:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from None
    unknown = sorted(set(raw) - {"database", "server", "api"})
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}")
    cfg = Config(database=_section(DatabaseConfig, raw.get("database", {}), "database"),
                 server=_section(ServerConfig, raw.get("server", {}), "server"),
                 api=_section(ApiConfig, raw.get("api", {}), "api"))
    if env.get("TANDEM_CENTER_DSN_FILE"):
        cfg.database.dsn_file = env["TANDEM_CENTER_DSN_FILE"]
    if env.get("TANDEM_CENTER_DSN"):
        cfg.database.dsn, cfg.database.dsn_file = env["TANDEM_CENTER_DSN"], ""
    if env.get("TANDEM_CENTER_BIND"):
        cfg.server.bind = env["TANDEM_CENTER_BIND"]
    if env.get("TANDEM_CENTER_PORT"):
        try:
            cfg.server.port = int(env["TANDEM_CENTER_PORT"])
        except ValueError:
            raise ConfigError("TANDEM_CENTER_PORT must be an integer") from None
    return cfg.validate()
