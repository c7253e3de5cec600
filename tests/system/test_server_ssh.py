"""ansible/server_ssh.py, the way `make logs|releases|health|...` reach the servers: which hosts of
the inventory a command runs on, and the exit status it reports (ssh replaced by a recorder)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_INVENTORY = ROOT / ".cache/ansible-venv/bin/ansible-inventory"


def server_ssh(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """server_ssh.py on the example cluster's inventory, with an ssh that prints its host and
    command, and fails (status 3) on api2."""
    assert ANSIBLE_INVENTORY.exists(), f"no {ANSIBLE_INVENTORY}: run `make ansible-tools`"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    ssh = bin_dir / "ssh"
    ssh.write_text(
        '#!/usr/bin/env bash\nwhile [ "$1" != -- ]; do last=$1; shift; done; shift\n'
        'echo "ran on $last: $*"\n[ "$last" != admin@203.0.113.12 ] || exit 3\n'
    )
    ssh.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("SERVER", "SSH_OPTS")}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return subprocess.run(
        [sys.executable, str(ROOT / "ansible/server_ssh.py"), *args,
         str(ROOT / "ansible/inventory/cluster.example.yml"), "--", "releases.sh", "list"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip


def test_a_command_runs_on_the_first_api_host_by_default(tmp_path: Path) -> None:
    run = server_ssh(tmp_path)
    assert (run.returncode, run.stdout) == (0, "ran on admin@203.0.113.11: releases.sh list\n")


def test_each_api_runs_on_every_api_host_and_reports_the_one_that_failed(tmp_path: Path) -> None:
    run = server_ssh(tmp_path, "--each-api")
    print(run.stdout, run.stderr)
    assert run.stdout.splitlines() == [
        "== api1 ==",
        "ran on admin@203.0.113.11: releases.sh list",
        "== api2 ==",
        "ran on admin@203.0.113.12: releases.sh list",
    ]
    assert run.returncode == 3
    assert run.stderr == "server_ssh: api2: exit status 3\n"


def test_each_runs_on_every_host_of_the_inventory_once(tmp_path: Path) -> None:
    run = server_ssh(tmp_path, "--each")
    headers = [line for line in run.stdout.splitlines() if line.startswith("==")]
    # front is the edge and the data host: one machine, one run.
    assert headers == ["== front ==", "== api1 ==", "== api2 =="]
    assert "ran on admin@203.0.113.10: releases.sh list" in run.stdout
