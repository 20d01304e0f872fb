"""tandem-center's config: a TOML file plus environment overrides, refused when wrong."""

import pytest

from tandem.center.config import ConfigError, load


def _write(tmp_path, text: str):
    path = tmp_path / "center.toml"
    path.write_text(text)
    return str(path)


def test_file_then_environment(tmp_path):
    dsn = tmp_path / "dsn"
    dsn.write_text("host=/run/postgresql dbname=tandem user=center\n")
    text = f'[database]\ndsn_file = "{dsn}"\npool_max = 3\n[server]\nport = 9000\n'
    cfg = load(_write(tmp_path, text), env={})
    assert (cfg.database.conninfo(), cfg.database.pool_max, cfg.server.port, cfg.server.bind) == (
        "host=/run/postgresql dbname=tandem user=center", 3, 9000, "127.0.0.1")
    env = {"TANDEM_CENTER_DSN_FILE": str(dsn), "TANDEM_CENTER_PORT": "9001", "TANDEM_CENTER_BIND": "::1"}
    cfg = load(_write(tmp_path, "[server]\nport = 9000\n"), env=env)
    assert (cfg.database.dsn_file, cfg.server.port, cfg.server.bind) == (str(dsn), 9001, "::1")


@pytest.mark.parametrize("text,message", [
    ("[server]\nprot = 1\n", "unknown key"),
    ("[servers]\n", "unknown section"),
    ('[server]\nport = "80"\n', "expected int"),
    ("[server]\nport = 70000\n", "out of range"),
    ('[server]\ntls_cert = "/c"\n', "go together"),
    ('[server]\ntls_cert = "/c"\ntls_key = "/k"\ntls_require_client_cert = true\n', "tls_client_ca"),
    ("[database]\npool_min = 5\npool_max = 2\n", "pool_min"),
    ("[api]\nmax_body_bytes = 10\n", "at least"),
    ("[server\n", "center.toml"),
])
def test_bad_config_is_refused(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load(_write(tmp_path, text), env={})


def test_a_missing_dsn_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no database"):
        load(_write(tmp_path, ""), env={}).database.conninfo()
    cfg = load(_write(tmp_path, f'[database]\ndsn_file = "{tmp_path}/none"\n'), env={})
    with pytest.raises(ConfigError, match="cannot read the DSN file"):
        cfg.database.conninfo()


def test_control_plane_section(tmp_path):

    dsn = tmp_path / "monitor.dsn"
    dsn.write_text("host=witness dbname=pg_auto_failover user=tandem_center_ro password=x\n")
    cfg = tmp_path / "center.toml"
    cfg.write_text(f'[control_plane]\nenabled = true\nnode_name = "cp-a"\nvip = "10.0.0.100"\n'
                   f'monitor_dsn_file = "{dsn}"\ninterval = 2\n')
    c = load(str(cfg), env={}).control_plane
    assert (c.enabled, c.node_name, c.vip, c.interval) == (True, "cp-a", "10.0.0.100", 2.0)
    assert c.monitor_conninfo().startswith("host=witness")
    for bad, why in (('vip = "10.0.0.300"\nnode_name = "a"', "not an IP"), ('vip = "10.0.0.1"', "node_name"),
                     ('node_name = "a b"', "node_name"), ("interval = 0", "positive")):
        cfg.write_text(f"[control_plane]\n{bad}\n")
        with pytest.raises(ConfigError, match=why):
            load(str(cfg), env={})
