"""Run a command over ssh on the Smally server: what `make logs|create-key|api|backup|releases|
health` use.

    python3 ansible/server_ssh.py [--tty] [--data|--each-api|--each] INVENTORY -- COMMAND [ARG...]

The server is the first host of the inventory's `smally_api` group (a cluster) or else of its
`smally` group (with --data: of `smally_data`, the database's host, or else of `smally`). With
--each-api the command runs on every API host, with --each on every host of `smally`, one after
the other, each one's output under a line `== host ==`; the exit status is the first non-zero
one (all are run). Hosts are reached the way Ansible reaches them (ansible_host, ansible_port,
ansible_user, ansible_ssh_private_key_file, ansible_ssh_common_args), read with
`ansible-inventory` from the tool venv. SERVER=user@host skips the inventory; SSH_OPTS adds ssh
options either way. COMMAND and its arguments are quoted for the remote shell, so an argument
with spaces stays one argument.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ANSIBLE_INVENTORY = REPO / ".cache" / "ansible-venv" / "bin" / "ansible-inventory"


def die(message: str) -> None:
    print(f"server_ssh: {message}", file=sys.stderr)
    sys.exit(2)


def group_hosts(data: dict, name: str) -> list[str]:
    """The hosts of a group of `ansible-inventory --list`, its children's included, in order."""
    group = data.get(name, {})
    hosts = list(group.get("hosts", []))
    for child in group.get("children", []):
        hosts += [host for host in group_hosts(data, child) if host not in hosts]
    return hosts


def from_inventory(inventory: str, group: str) -> list[tuple[str, list[str]]]:
    """Each host of `group` (else of `smally`) as its name and its ssh arguments."""
    if not Path(inventory).exists():
        die(f"no inventory {inventory}: see ansible/inventory/hosts.example.yml, or set SERVER")
    program = (
        str(ANSIBLE_INVENTORY) if ANSIBLE_INVENTORY.exists() else shutil.which("ansible-inventory")
    )
    if not program:
        die("ansible-inventory is missing: run `make ansible-tools`, or set SERVER=user@host")
    listed = subprocess.run(
        [program, "-i", inventory, "--list"], check=True, capture_output=True, text=True
    )
    data = json.loads(listed.stdout)
    # On a cluster (ansible/inventory/cluster.example.yml) the role's group.
    hosts = group_hosts(data, group) or group_hosts(data, "smally")
    if not hosts:
        die(f"{inventory} has no host in the group `smally`")
    return [
        (host, ssh_arguments(data.get("_meta", {}).get("hostvars", {}).get(host, {}), host))
        for host in hosts
    ]


def ssh_arguments(hostvars: dict, host: str) -> list[str]:
    args: list[str] = []
    if "ansible_port" in hostvars:
        args += ["-p", str(hostvars["ansible_port"])]
    if "ansible_ssh_private_key_file" in hostvars:
        args += ["-i", os.path.expanduser(str(hostvars["ansible_ssh_private_key_file"]))]
    args += shlex.split(str(hostvars.get("ansible_ssh_common_args", "")))
    address = str(hostvars.get("ansible_host", host))
    user = hostvars.get("ansible_user")
    return [*args, f"{user}@{address}" if user else address]


def main() -> None:
    argv = sys.argv[1:]
    tty = "--tty" in argv[:1]
    if tty:
        argv = argv[1:]
    group, each = "smally_api", False
    if argv[:1] == ["--data"]:
        group, argv = "smally_data", argv[1:]
    elif argv[:1] == ["--each-api"]:
        each, argv = True, argv[1:]
    elif argv[:1] == ["--each"]:
        group, each, argv = "smally", True, argv[1:]
    if len(argv) < 3 or argv[1] != "--":
        die("usage: server_ssh.py [--tty] [--data|--each-api|--each] INVENTORY -- COMMAND [ARG...]")
    inventory, command = argv[0], argv[2:]
    server = os.environ.get("SERVER", "").strip()
    targets = [(server, [server])] if server else from_inventory(inventory, group)
    options = ["-o", "BatchMode=yes", *shlex.split(os.environ.get("SSH_OPTS", ""))]
    if tty and sys.stdin.isatty():
        options.append("-t")
    if not each:
        os.execvp("ssh", ["ssh", *options, *targets[0][1], "--", shlex.join(command)])
    status = 0
    for name, target in targets:
        print(f"== {name} ==", flush=True)
        run = subprocess.run(["ssh", *options, *target, "--", shlex.join(command)], check=False)
        if run.returncode:
            status = status or run.returncode
            print(f"server_ssh: {name}: exit status {run.returncode}", file=sys.stderr, flush=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
