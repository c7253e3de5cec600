"""nginx/smally.conf in Debian's nginx, rendered by Ansible with the deployment's variables, in a
network namespace of its own: clients on several IPv6 addresses of its loopback, the real `api`
behind it on a socket inside the namespace (as systemd passes one), PostgreSQL and Redis reached
from the host as usual. Nothing leaves the namespace.

Needs root (`ip netns`); `make test` unpacks nginx (`make nginx`) and makes the Ansible venv."""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.conftest import Servers
from tests.helpers import ApiProcess, base_env, create_key, socket_activated

ROOT = Path(__file__).resolve().parents[2]
NGINX = ROOT / ".cache/nginx/nginx"
ANSIBLE = ROOT / ".cache/ansible-venv/bin/ansible"
VENV_API = ROOT / ".venv/bin/api"
MAX_REQUEST_BYTES = 2048  # the service's limit here (and smally_max_request_bytes)
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Cross-Origin-Resource-Policy": "same-origin",
}
# The clients, each an address on the namespace's loopback. Their networks hold the bytes 0x0a
# (newline), 0x0d and 0x0b: a key read as text would split or merge them. ONE_A and ONE_B share
# a /64; OTHER differs from it in the last byte of the /64 alone.
ONE_A = "2001:db8:a0d:a0a::a0d:1"
ONE_B = "2001:db8:a0d:a0a:ffff::2"
OTHER = "2001:db8:a0d:a0b::a0d:1"
ENVELOPES = "2001:db8:1::1"
CONN_A, CONN_B = "2001:db8:2::1", "2001:db8:2::2"
BODY = "2001:db8:3::1"
HEALTH = "2001:db8:4::1"
V4_A, V4_B = "127.0.0.2", "127.0.0.3"  # IPv4: each address a client of its own
CLIENTS = (ONE_A, ONE_B, OTHER, ENVELOPES, CONN_A, CONN_B, BODY, HEALTH)
# Small limits, so that a few requests reach them: 3 requests per client network (1 a minute,
# bursts of 2: none comes back within the test), 1 request at a time.
LIMITS = {
    "smally_rate_limit": "1r/m",
    "smally_rate_burst": 2,
    "smally_site_rate_limit": "1r/m",
    "smally_site_rate_burst": 2,
    "smally_conn_limit": 1,
    "smally_max_request_bytes": MAX_REQUEST_BYTES,
}

T = TypeVar("T")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def in_namespace(name: str, work: Callable[[], T]) -> T:
    """`work()` on a thread of its own that has entered network namespace `name` (setns(2) moves
    the calling thread only): the sockets it opens live there."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            with open(f"/run/netns/{name}") as namespace:
                if _libc.setns(namespace.fileno(), _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {name}")
            outcome["value"] = work()
        except BaseException as exc:  # raised again on the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@dataclass
class Answer:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def render_site(variables: dict[str, Any], workdir: Path) -> str:
    """nginx/smally.conf rendered by Ansible's template module, as ansible/site.yml renders it
    for a single server: the role's defaults, ansible/vars/smally.yml, then `variables`."""
    assert ANSIBLE.exists(), f"no {ANSIBLE}: run `make ansible-tools` (make test does)"
    inventory = workdir / "inventory.yml"
    inventory.write_text("smally:\n  hosts:\n    edge-test:\n      ansible_connection: local\n")
    site = workdir / "smally.conf"
    run = subprocess.run(
        [
            str(ANSIBLE),
            "edge-test",
            "-i",
            str(inventory),
            "-m",
            "ansible.builtin.template",
            "-a",
            f"src={ROOT / 'nginx/smally.conf'} dest={site} mode=0644",
            "-e",
            f"@{ROOT / 'ansible/roles/smally/defaults/main.yml'}",
            "-e",
            f"@{ROOT / 'ansible/vars/smally.yml'}",
            "-e",
            json.dumps({**variables, "ansible_python_interpreter": str(ANSIBLE.parent / "python")}),
        ],
        cwd=workdir,
        env={**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCALHOST_WARNING": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return site.read_text()


class Edge:
    """A network namespace with `addresses` on its loopback and nginx serving the rendered site
    in it (on port 80, as deployed), on a throwaway prefix."""

    def __init__(self, workdir: Path, addresses: tuple[str, ...]) -> None:
        self.workdir = workdir
        self.addresses = addresses
        self.namespace = f"smally-edge-{uuid.uuid4().hex[:8]}"
        self.nginx: subprocess.Popen[bytes] | None = None

    def create_namespace(self) -> None:
        ip = ["ip", "-n", self.namespace]
        subprocess.run(["ip", "netns", "add", self.namespace], check=True)
        subprocess.run([*ip, "link", "set", "lo", "up"], check=True)
        for address in self.addresses:
            if ":" in address:
                subprocess.run(
                    [*ip, "-6", "addr", "add", f"{address}/128", "dev", "lo"], check=True
                )

    def start_nginx(self, site: str) -> None:
        prefix = self.workdir / "nginx"
        (prefix / "temp").mkdir(parents=True)
        (prefix / "smally.conf").write_text(site)
        temp = " ".join(
            f"{kind}_temp_path {prefix}/temp/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        # Debian's nginx.conf reduced to what the site needs; the paths in the prefix.
        (prefix / "nginx.conf").write_text(
            f"user root root;\nworker_processes 1;\npid {prefix}/nginx.pid;\n"
            f"error_log {prefix}/error.log notice;\n"
            "events { worker_connections 256; }\n"
            f"http {{ access_log off; {temp}\n include {prefix}/smally.conf;\n}}\n"
        )
        command = ["ip", "netns", "exec", self.namespace, str(NGINX), "-p", str(prefix)]
        command += ["-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")]
        checked = subprocess.run([*command, "-t", "-q"], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr + self.error_log()
        self.nginx = subprocess.Popen([*command, "-g", "daemon off;"])
        deadline = time.monotonic() + 10
        while not self._answers():
            assert self.nginx.poll() is None, f"nginx exited: {self.error_log()}"
            assert time.monotonic() < deadline, f"nginx does not answer: {self.error_log()}"
            time.sleep(0.05)

    def _answers(self) -> bool:
        def probe() -> bool:
            try:
                socket.create_connection(("127.0.0.1", 80), timeout=1).close()
                return True
            except OSError:
                return False

        return in_namespace(self.namespace, probe)

    def request(
        self,
        client: str,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        port: int = 80,
    ) -> Answer:
        """One request from `client` (an address in the namespace) to nginx, or to `port`."""

        def send() -> Answer:
            target = "127.0.0.1" if client.startswith("127.") else client
            connection = http.client.HTTPConnection(
                target, port, source_address=(client, 0), timeout=30
            )
            try:
                sent = {"Content-Type": "application/json", **(headers or {})}
                connection.request(method, path, body=body, headers=sent)
                response = connection.getresponse()
                return Answer(response.status, response.headers, response.read())
            finally:
                connection.close()

        return in_namespace(self.namespace, send)

    def error_log(self) -> str:
        log = self.workdir / "nginx" / "error.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def stop(self) -> None:
        try:
            if self.nginx is not None and self.nginx.poll() is None:
                self.nginx.send_signal(signal.SIGTERM)
                try:
                    self.nginx.wait(10)
                except subprocess.TimeoutExpired:
                    self.nginx.kill()
                    self.nginx.wait()
        finally:
            subprocess.run(["ip", "netns", "del", self.namespace], check=False)


def needs_root_and_nginx() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces (ip netns)")
    assert NGINX.exists(), f"no {NGINX}: run `make nginx` (make test does)"


@dataclass
class Served:
    edge: Edge
    api: ApiProcess
    api_port: int
    body_limit: int  # the rendered client_max_body_size
    key: str


@pytest.fixture(scope="module")
def served(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """nginx in front of the real service, whose socket is in the namespace."""
    needs_root_and_nginx()
    workdir = tmp_path_factory.mktemp("edge")
    edge = Edge(workdir, (*CLIENTS, V4_A, V4_B))
    api: ApiProcess | None = None
    try:
        edge.create_namespace()
        listener = in_namespace(
            edge.namespace, lambda: socket.create_server(("127.0.0.1", 0), backlog=256)
        )
        with listener:
            port = listener.getsockname()[1]
            env = base_env(
                DATABASE_URL=servers.new_database(),
                REDIS_URL=servers.redis_url,
                MAX_REQUEST_BYTES=str(MAX_REQUEST_BYTES),
            )
            wrapper = socket_activated(workdir, listener, VENV_API)
            api = ApiProcess(
                env, workdir, port=port, executable=wrapper, pass_fds=(listener.fileno(),)
            )
            api.start()
        site = render_site({**LIMITS, "smally_api_port": port}, workdir)
        edge.start_nginx(site)
        limit = re.search(r"^\s*client_max_body_size (\d+);", site, re.M)
        assert limit, site
        wait_healthy(edge, api, port)
        key = create_key(api.env, api.workdir, "edge@example.com", "pro")
        yield Served(edge, api, port, int(limit.group(1)), key)
    finally:
        try:
            if api is not None:
                api.stop()
        finally:
            edge.stop()


def wait_healthy(edge: Edge, api: ApiProcess, port: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert api.process is not None and api.process.poll() is None, api.logs()
        try:
            if edge.request("127.0.0.1", "GET", "/health", port=port).status == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"api not healthy in {timeout} s: {api.logs()}"
        time.sleep(0.2)


def assert_edge_json(answer: Answer, status: int) -> Any:
    """nginx's own answer: `status`, JSON, the security headers once each; its parsed body."""
    assert answer.status == status, (answer.status, answer.body[:300])
    assert answer.headers.get("Content-Type") == "application/json", answer.headers
    for name, value in SECURITY_HEADERS.items():
        assert answer.headers.get_all(name) == [value], (name, answer.headers.get_all(name))
    return answer.json()


def smally_error(answer: Answer, status: int, code: str) -> dict:
    body = assert_edge_json(answer, status)
    assert set(body) == {"error", "message"} and body["error"] == code, body
    return body


def openai_error(answer: Answer, status: int, code: str, kind: str) -> dict:
    body = assert_edge_json(answer, status)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, body
    assert (error["code"], error["type"], error["param"]) == (code, kind, None), body
    return body


def embed(edge: Edge, client: str, path: str = "/v1/embed") -> Answer:
    text = {"/v1/embed": {"text": "hello"}, "/v1/embeddings": {"input": "hello"}}[path]
    return edge.request(client, "POST", path, body=json.dumps(text).encode())


def test_two_clients_of_one_ipv6_64_share_a_limit_and_another_64_has_its_own(
    served: Served,
) -> None:
    edge = served.edge
    # Without a key the service answers 401: the request got through nginx's limit.
    first = [embed(edge, ONE_A).status for _ in range(4)]
    assert first == [401, 401, 401, 429], first
    assert embed(edge, ONE_B).status == 429  # another address, the same /64
    assert embed(edge, OTHER).status == 401  # the next /64
    # IPv4: each address is a client of its own.
    assert [embed(edge, V4_A).status for _ in range(4)] == [401, 401, 401, 429]
    assert embed(edge, V4_B).status == 401
    print(f"{ONE_A}: {first}; {ONE_B}: 429; {OTHER}: 401; {V4_A} limited, {V4_B} not")


def test_nginx_429_is_json_with_retry_after_in_both_envelopes(served: Served) -> None:
    edge = served.edge
    for _ in range(3):  # the client's rate and burst, used up
        embed(edge, ENVELOPES)
    ours = embed(edge, ENVELOPES)
    smally_error(ours, 429, "rate_limited")
    openai = [
        embed(edge, ENVELOPES, "/v1/embeddings"),
        edge.request(ENVELOPES, "GET", "/v1/models"),
    ]
    for answer in (ours, *openai):
        assert answer.headers.get_all("Retry-After") == ["1"], answer.headers
    for answer in openai:
        openai_error(answer, 429, "rate_limited", "requests")
    assert 'by zone "smally_api"' in edge.error_log()


def test_nginx_429_for_too_many_requests_at_once_is_json_with_retry_after(served: Served) -> None:
    edge = served.edge

    def hold() -> socket.socket:  # a request whose body is still on its way holds its slot
        slow = socket.create_connection((CONN_A, 80), source_address=(CONN_A, 0), timeout=10)
        slow.sendall(b"POST /v1/embed HTTP/1.1\r\nHost: smally\r\nContent-Length: 100\r\n\r\n{")
        return slow

    slow = in_namespace(edge.namespace, hold)
    try:
        time.sleep(0.3)  # nginx has read its headers
        answer = embed(edge, CONN_B)  # the same /64, its limit_req burst untouched
    finally:
        slow.close()
    smally_error(answer, 429, "rate_limited")
    assert answer.headers.get_all("Retry-After") == ["1"], answer.headers
    assert 'limiting connections by zone "smally_conn"' in edge.error_log()


def test_a_body_slightly_over_the_limit_gets_the_services_413_and_far_over_nginxs_json_413(
    served: Served,
) -> None:
    edge = served.edge
    assert MAX_REQUEST_BYTES < served.body_limit <= MAX_REQUEST_BYTES + 65536
    # With a key: the service reads the body of an authenticated request only.
    auth = {"Authorization": f"Bearer {served.key}"}
    slightly = edge.request(
        BODY, "POST", "/v1/embed", body=b" " * (MAX_REQUEST_BYTES + 100), headers=auth
    )
    assert slightly.status == 413, slightly.body
    assert slightly.json()["max_bytes"] == MAX_REQUEST_BYTES  # the service's own answer
    far = b" " * (served.body_limit + 1)
    body = smally_error(edge.request(BODY, "POST", "/v1/embed", body=far), 413, "payload_too_large")
    assert str(served.body_limit) in body["message"]
    openai = edge.request(BODY, "POST", "/v1/embeddings", body=far)
    openai_error(openai, 413, "payload_too_large", "invalid_request_error")


def test_health_through_nginx_names_no_build_and_direct_from_this_machine_does(
    served: Served,
) -> None:
    edge = served.edge
    through = edge.request(HEALTH, "GET", "/health")
    assert through.status == 200 and through.json() == {"status": "healthy"}, through.body
    direct = edge.request("127.0.0.1", "GET", "/health", port=served.api_port)
    assert direct.status == 200 and direct.json()["build"]["release"], direct.body
    print(f"through nginx: {through.body!r}; direct: {sorted(direct.json())}")


def test_every_location_that_passes_to_the_service_has_a_request_limit(
    tmp_path: Path,
) -> None:
    for tls in (False, True):
        tls_vars = {"smally_tls_certificate": "/c.pem", "smally_tls_certificate_key": "/k.pem"}
        site = render_site(tls_vars if tls else {}, tmp_path)
        locations = re.findall(r"^\s*location ([^{]+)\{(.*?)^\s*\}", site, re.M | re.S)
        proxied = {where.strip(): body for where, body in locations if "proxy_pass" in body}
        assert {"/v1/", "/v1/embeddings", "/v1/models", "= /health", "/"} <= set(proxied)
        for where, body in proxied.items():
            assert re.search(r"^\s*limit_req zone=smally_\w+ ", body, re.M), (tls, where)
        assert re.search(r"^\s*limit_conn smally_conn \d+;", site, re.M)


def test_nginx_answers_json_502_when_the_service_is_down(tmp_path: Path) -> None:
    needs_root_and_nginx()
    edge = Edge(tmp_path, (ENVELOPES,))
    try:
        edge.create_namespace()
        # A port nothing listens on in the new namespace: every connection is refused.
        edge.start_nginx(render_site({"smally_api_port": 9}, tmp_path))
        smally_error(embed(edge, ENVELOPES), 502, "upstream_unavailable")
        openai = embed(edge, ENVELOPES, "/v1/embeddings")
        openai_error(openai, 502, "upstream_unavailable", "server_error")
        smally_error(edge.request(ENVELOPES, "GET", "/health"), 502, "upstream_unavailable")
    finally:
        edge.stop()
