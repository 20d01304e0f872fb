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

    [monitor]                             # follow the engines (tandem.center.monitor)
    enabled = true
    client_cert = "/etc/tandem/pki/center.crt"  # from the CA the engines' --monitor-ca names
    client_key = "/etc/tandem/pki/center.key"
    engine_ca = "/etc/tandem/pki/sites-ca.crt"  # verifies the engines' certificates
    interval = 5.0                        # seconds between status polls
    unreachable_after = 30.0              # engine-unreachable alert after this long
    backoff_max = 30.0                    # reconnect backoff cap
    rpo_max_bytes = 0                     # RPO exposure alert above this many bytes (0: off)

    [control_plane]                       # control-plane alerts (tandem.center.control_plane)
    enabled = false                       # witness-down, db-sync-lost, vip-moved
    node_name = "cp-a"                    # this instance's control node (names the VIP holder)
    vip = "10.0.0.100"                    # vip-moved: is the VIP on one of this node's interfaces
    monitor_dsn_file = "/etc/tandem/center-monitor.dsn"  # witness-down: the pg_auto_failover
                                          # monitor (a read-only user; the file 0600)
    formation = "default"                 # the pg_auto_failover formation of the trio
    interval = 5.0                        # seconds between checks
    timeout = 3.0                         # each probe (the monitor, `ip`) gives up after this
    witness_down_after = 10.0             # witness-down once it has failed to answer this long

    [schedules]                           # periodic RPs (tandem.center.schedules), exactly once
    enabled = true                        # on every instance: the leader acts, the others wait
    tick = 1.0                            # seconds between leadership checks (the takeover delay)
    request_timeout = 30.0                # an engine's rp-create/rp-delete answer
    connect_timeout = 5.0                 # the scheduler's own database connection
    retry_s = 5.0                         # a failed RP is retried after this (within its slot)
    primary_fresh_s = 60.0                # engine state older than this does not pick the engine
    # the engines are reached with [monitor] client_cert, client_key and engine_ca

    [alerts]                              # sinks (tandem.center.sinks); each optional
    webhook_url = "https://hooks.example/tandem"
    webhook_timeout = 5.0
    webhook_retries = 3
    syslog_address = "/dev/log"           # or "host:514" (UDP)
    syslog_facility = "daemon"
    smtp_host = ""                        # e-mail: smtp_host, smtp_port, smtp_from, smtp_to
    smtp_port = 25
    smtp_from = ""
    smtp_to = []

Environment: TANDEM_CENTER_CONFIG (the file), TANDEM_CENTER_DSN_FILE, TANDEM_CENTER_DSN (a DSN
without a password; libpq also reads PGPASSFILE), TANDEM_CENTER_BIND, TANDEM_CENTER_PORT.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

DEFAULT_CONFIG = "/etc/tandem/center.toml"
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


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
class MonitorConfig:
    enabled: bool = False
    client_cert: str = ""
    client_key: str = ""
    engine_ca: str = ""
    interval: float = 5.0
    unreachable_after: float = 30.0
    backoff_max: float = 30.0
    connect_timeout: float = 5.0
    rpo_max_bytes: int = 0


@dataclass
class ControlPlaneConfig:
    enabled: bool = False
    node_name: str = ""
    vip: str = ""
    monitor_dsn_file: str = ""
    formation: str = "default"
    interval: float = 5.0
    timeout: float = 3.0
    witness_down_after: float = 10.0

    def monitor_conninfo(self) -> str:
        """The monitor's DSN ("" when none is configured); the file holds its password."""
        if not self.monitor_dsn_file:
            return ""
        return DatabaseConfig(dsn_file=self.monitor_dsn_file).conninfo()

    def validate(self) -> None:
        if not (0 < self.interval <= 3600 and 0 < self.timeout <= 60 and self.witness_down_after >= 0):
            raise ConfigError("control_plane.interval, timeout (at most 60) and witness_down_after must be "
                              "positive")
        if self.node_name and not _NODE_NAME.fullmatch(self.node_name):
            raise ConfigError(f"control_plane.node_name {self.node_name!r}: letters, digits, '.', '_', '-' "
                              "(at most 63)")
        if self.vip:
            try:
                ipaddress.ip_address(self.vip)
            except ValueError:
                raise ConfigError(f"control_plane.vip {self.vip!r} is not an IP address") from None
            if not self.node_name:
                raise ConfigError("control_plane.vip needs control_plane.node_name (who holds it)")


@dataclass
class SchedulesConfig:
    enabled: bool = False
    tick: float = 1.0
    request_timeout: float = 30.0
    connect_timeout: float = 5.0
    retry_s: float = 5.0
    primary_fresh_s: float = 60.0


@dataclass
class AlertsConfig:
    webhook_url: str = ""
    webhook_timeout: float = 5.0
    webhook_retries: int = 3
    syslog_address: str = ""
    syslog_facility: str = "daemon"
    smtp_host: str = ""
    smtp_port: int = 25
    smtp_from: str = ""
    smtp_to: list = field(default_factory=list)


@dataclass
class Config:
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    schedules: SchedulesConfig = field(default_factory=SchedulesConfig)
    control_plane: ControlPlaneConfig = field(default_factory=ControlPlaneConfig)

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
        m = self.monitor
        if m.enabled and not (m.client_cert and m.client_key and m.engine_ca):
            raise ConfigError("monitor.enabled needs monitor.client_cert, client_key and engine_ca")
        if not (0 < m.interval <= 3600 and m.backoff_max > 0 and m.connect_timeout > 0):
            raise ConfigError("monitor.interval, backoff_max and connect_timeout must be positive")
        sc = self.schedules
        if sc.enabled and not (m.client_cert and m.client_key and m.engine_ca):
            raise ConfigError("schedules.enabled needs monitor.client_cert, client_key and engine_ca "
                              "(the engines' control permission takes the same client certificate)")
        if not (0 < sc.tick <= 60 and sc.request_timeout > 0 and sc.connect_timeout > 0 and sc.retry_s > 0
                and sc.primary_fresh_s > 0):
            raise ConfigError("schedules.tick (at most 60), request_timeout, connect_timeout, retry_s and "
                              "primary_fresh_s must be positive")
        self.control_plane.validate()
        a = self.alerts
        if a.webhook_url and not a.webhook_url.startswith(("http://", "https://")):
            raise ConfigError("alerts.webhook_url must be an http(s) URL")
        if a.smtp_host and not (a.smtp_from and a.smtp_to):
            raise ConfigError("alerts.smtp_host needs smtp_from and smtp_to")
        if not all(isinstance(x, str) for x in a.smtp_to):
            raise ConfigError("alerts.smtp_to must be a list of addresses")
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
        if want is float and type(value) is int:      # `interval = 5` means 5.0
            value = float(value)
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
    unknown = sorted(set(raw) - {"database", "server", "api", "monitor", "alerts", "schedules",
                                 "control_plane"})
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}")
    cfg = Config(database=_section(DatabaseConfig, raw.get("database", {}), "database"),
                 server=_section(ServerConfig, raw.get("server", {}), "server"),
                 api=_section(ApiConfig, raw.get("api", {}), "api"),
                 monitor=_section(MonitorConfig, raw.get("monitor", {}), "monitor"),
                 alerts=_section(AlertsConfig, raw.get("alerts", {}), "alerts"),
                 schedules=_section(SchedulesConfig, raw.get("schedules", {}), "schedules"),
                 control_plane=_section(ControlPlaneConfig, raw.get("control_plane", {}), "control_plane"))
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
