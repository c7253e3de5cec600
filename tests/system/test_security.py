"""Security properties (issue #7), each checked on the running service the way a reviewer would.

This module runs its own PostgreSQL with `log_statement = all` on the service's database, so the
tests read what the service actually sends to PostgreSQL instead of trusting the code: key lookups
are by SHA-256 only, and no plain key ever reaches the database. Keys carry 256 bits from
`secrets` and exist only in `create_api_key`'s output. A flood of 10,000 random keys costs a
bounded number of queries (counted by PostgreSQL and by the service's metric), and the valid user's
latency under it is measured and printed (never asserted: the machine is shared). Every answer
carries the security headers and no server banner.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import multiprocessing
import queue
import re
import secrets
import socket
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from starlette.routing import Mount, Route

from app.admin import keys as app_keys
from app.admin.keys import create_key as create_key_in
from app.config import Settings
from app.http.app import create_app
from app.serving.auth import hash_key
from dev.servers import LocalPostgres
from tests.conftest import Servers
from tests.helpers import ApiProcess, base_env, create_key, run_cli

PREFIX = "sk_"
DISPLAY_CHARS = 8  # of the key body, kept in api_keys.key_prefix so people can tell keys apart
FREE_TIER_LIMIT = 3  # small, so a free key reaches 429 in a few requests
FLOOD_REQUESTS = 10_000
FLOOD_CONCURRENCY = 32
MAX_FLOOD_QUERIES = 2_500
PROBE_ALONE = 100
PROBE_PAUSE = 0.02  # the valid user sends at most 50 requests a second: a user, not a load
TRICKLE_REQUESTS = 500
TRICKLE_RATE = 400  # keys a second: each answered before the next comes


# --- What PostgreSQL saw ---------------------------------------------------------------------

_ENTRY = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \S+ \[(\d+)\] ([A-Z]+):  ", re.MULTILINE
)
_STATEMENT = re.compile(r"^(?:statement|execute [^:]*): (.*)$", re.DOTALL)


@dataclass
class Statement:
    pid: str
    sql: str
    parameters: list[str] = field(default_factory=list)


@dataclass
class PostgresLog:
    """The server log of this module's PostgreSQL, which logs every statement of `database_url`."""

    path: Path
    database_url: str

    def sync(self) -> int:
        """Wait until everything sent so far is in the log; return the log's size then.

        PostgreSQL logs a statement when it receives it, before it answers, so a statement whose
        answer came back before this call is in the log before this call's marker.
        """
        marker = f"smally-log-marker-{uuid.uuid4().hex}"
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(f"SELECT '{marker}'")
        deadline = time.monotonic() + 10
        while marker not in (text := self.path.read_text(errors="replace")):
            assert time.monotonic() < deadline, f"marker never reached {self.path}"
            time.sleep(0.02)
        return len(text)

    def text(self, start: int = 0, end: int | None = None) -> str:
        return self.path.read_text(errors="replace")[start:end]

    def statements(self, start: int, end: int) -> list[Statement]:
        """Statements logged between two `sync()`s (the markers left out), with parameters."""
        text = self.text(start, end)
        entries = list(_ENTRY.finditer(text))
        found: list[Statement] = []
        last_of_pid: dict[str, Statement] = {}
        for entry, following in zip(entries, [*entries[1:], None], strict=True):
            message = text[entry.end() : following.start() if following else len(text)].strip()
            pid, level = entry.group(1), entry.group(2)
            if level == "LOG" and (statement := _STATEMENT.match(message)):
                if "smally-log-marker-" not in statement.group(1):
                    last_of_pid[pid] = Statement(pid, statement.group(1))
                    found.append(last_of_pid[pid])
            # "Parameters:" since PostgreSQL 16, "parameters:" before.
            elif (
                level == "DETAIL"
                and message.lower().startswith("parameters: ")
                and pid in last_of_pid
            ):
                last_of_pid[pid].parameters = _parameters(message[len("parameters: ") :])
        return found


def _parameters(detail: str) -> list[str]:
    """`$1 = '{a,b}', $2 = 'x'` -> ['{a,b}', 'x'] (quotes doubled inside values)."""
    return [value.replace("''", "'") for value in re.findall(r"\$\d+ = '((?:[^']|'')*)'", detail)]


def lookups(statements: list[Statement]) -> list[Statement]:
    """The statements that read api_keys (the last_used_at flusher's UPDATE is left out)."""
    return [
        s for s in statements if "api_keys" in s.sql and s.sql.lstrip().upper().startswith("SELECT")
    ]


# --- Where a key could leak ------------------------------------------------------------------


def leaked(text: str, key: str) -> list[str]:
    """Pieces of `key` longer than its display prefix that occur in `text` (as text or as the hex
    of its bytes). The display prefix itself is public: `api keys list` shows it."""
    width = len(PREFIX) + DISPLAY_CHARS + 1
    forms = (key, key.encode().hex())
    return [
        form[i : i + width]
        for form in forms
        for i in range(len(form) - width + 1)
        if form[i : i + width] in text
    ]


def database_dump(database_url: str) -> str:
    """Every row of every table of every schema (ours and yoyo's), each row as text."""
    with psycopg.connect(database_url) as conn:
        tables = conn.execute(
            """
            SELECT format('%I.%I', table_schema, table_name) FROM information_schema.tables
             WHERE table_type = 'BASE TABLE'
               AND table_schema NOT IN ('pg_catalog', 'information_schema')
            """
        ).fetchall()
        assert any(name == "public.api_keys" for (name,) in tables), tables
        rows = [
            f"{name}: {row[0]}"
            for (name,) in tables
            for row in conn.execute(f"SELECT t::text FROM {name} t").fetchall()
        ]
    return "\n".join(rows)


def redis_dump(redis_url: str, key_prefix: str) -> str:
    client = redis.Redis.from_url(redis_url)
    try:
        names = list(client.scan_iter(match=f"{key_prefix}*", count=1000))
        assert names, "the service wrote nothing to Redis: nothing was checked"
        # The service writes strings only; anything else is dumped whole.
        values = [
            client.get(name) if client.type(name) == b"string" else client.dump(name)
            for name in names
        ]
        return "\n".join(
            f"{name.decode('latin-1')} = {(value or b'').decode('latin-1')}"
            for name, value in zip(names, values, strict=True)
        )
    finally:
        client.close()


# --- The service under test ------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPostgres]:
    """A PostgreSQL of this module's own, so its log is ours to read (also when the other
    tests use TEST_DATABASE_URL)."""
    server = LocalPostgres(tmp_path_factory.mktemp("postgres"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def module_env(postgres: LocalPostgres, servers: Servers) -> dict[str, str]:
    """The `api` fixture's settings: a database whose every statement is logged."""
    name = f"sec_{uuid.uuid4().hex[:8]}"
    database_url = postgres.create_database(name)
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {name} SET log_statement = 'all'")
    # debug: the strictest level for the "no key in the logs" checks.
    return base_env(
        DATABASE_URL=database_url,
        REDIS_URL=servers.redis_url,
        FREE_TIER_LIMIT=str(FREE_TIER_LIMIT),
        LOG_LEVEL="debug",
    )


@pytest.fixture(scope="module")
def pglog(postgres: LocalPostgres, module_env: dict[str, str]) -> PostgresLog:
    return PostgresLog(postgres.pgdata / "server.log", module_env["DATABASE_URL"])


@pytest.fixture(scope="module")
def scale_key(api: ApiProcess) -> str:
    return create_key(api.env, api.workdir, "valid-user@example.com", "scale")


def random_key() -> str:
    return PREFIX + secrets.token_hex(32)


def lookup_queries(api: ApiProcess) -> float:
    text = httpx.get(f"{api.base_url}/metrics", timeout=10).text
    return next(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "smally_key_lookup_queries_total"
    )


def embed(client: httpx.Client, key: str, text: str = "hello") -> httpx.Response:
    return client.post("/v1/embed", json={"text": text}, headers={"Authorization": f"Bearer {key}"})


# --- 1. Key comparison cannot be timed -------------------------------------------------------


def near_misses(key: str) -> list[str]:
    """Keys a prefix scan or a sloppy comparison would mistake for `key`."""
    body = key.removeprefix(PREFIX)
    flip = "0" if key[-1] != "0" else "1"
    return [
        key[:-1] + flip,  # all but the last character
        flip + key[1:],  # all but the first
        key[: len(PREFIX) + DISPLAY_CHARS] + secrets.token_hex(28),  # the display prefix
        key[: len(PREFIX) + 32] + secrets.token_hex(16),  # half the body
        key[:-1],  # truncated
        key + "0",  # extended
        key.upper(),
        PREFIX.upper() + body,
        "sk-" + body,
        body,  # no prefix
        key[: len(PREFIX) + DISPLAY_CHARS],  # the display prefix alone
        hash_key(key),  # the stored hash, presented as a key
    ]


def test_near_miss_keys_are_refused_like_any_unknown_key(api: ApiProcess, scale_key: str) -> None:
    with api.client() as client:
        assert embed(client, scale_key).status_code == 200
        unknown = embed(client, random_key())
        for candidate in near_misses(scale_key):
            response = embed(client, candidate)
            assert response.status_code == 401, candidate
            # Indistinguishable from a random key: same status, same body, same headers.
            assert response.json() == unknown.json()
            assert response.json()["error"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == unknown.headers["www-authenticate"]
        assert embed(client, scale_key).status_code == 200


def test_postgres_is_asked_by_sha256_only(api: ApiProcess, pglog: PostgresLog) -> None:
    # A key of its own: near misses of another test's key may still be cached, unasked.
    key = create_key(api.env, api.workdir, "hashed@example.com", "pro")
    presented = [*near_misses(key), random_key()]
    start = pglog.sync()
    with api.client() as client:
        for candidate in presented:
            assert embed(client, candidate).status_code == 401
    end = pglog.sync()

    statements = lookups(pglog.statements(start, end))
    assert statements, "no key lookup reached PostgreSQL: nothing was checked"
    asked: set[str] = set()
    for statement in statements:
        sql = " ".join(statement.sql.lower().split())
        # An indexed equality on the hash, and nothing that compares or scans keys otherwise.
        assert re.search(r"key_hash = (any\()?\$1\b", sql), statement.sql
        for scan in ("like", "starts_with", "key_prefix", "substr", "left(", "position(", "~"):
            assert scan not in sql, (scan, statement.sql)
        assert len(statement.parameters) == 1, statement
        values = statement.parameters[0].strip("{}").split(",")
        assert all(re.fullmatch(r"[0-9a-f]{64}", value) for value in values), statement
        asked.update(values)
    # Every presented key was looked up by its hash; nothing else was asked.
    assert asked == {hash_key(candidate) for candidate in presented}
    window = pglog.text(start, end)
    for candidate in presented:
        assert not leaked(window, candidate), candidate


# --- 2. 256 bits from `secrets`; the plain key exists only in create_api_key's output ---------


def test_keys_are_256_random_bits(module_env: dict[str, str]) -> None:
    """1,000 keys through the code `create_api_key` runs (create_key, into the database)."""
    with psycopg.connect(module_env["DATABASE_URL"], autocommit=True) as conn:
        created = [
            create_key_in(conn, "entropy@example.com", "free", None, PREFIX) for _ in range(1000)
        ]
        stored = dict(
            conn.execute(
                "SELECT key_hash, key_prefix FROM api_keys k JOIN users u ON u.id = k.user_id"
                " WHERE u.email = 'entropy@example.com'"
            ).fetchall()
        )
    bodies = []
    for item in created:
        assert re.fullmatch(r"sk_[0-9a-f]{64}", item.key), item.key
        body = bytes.fromhex(item.key.removeprefix(PREFIX))
        assert len(body) == 32
        bodies.append(body)
        # Stored: the hash and the display prefix (32 of the 256 bits); never more of the key.
        assert stored[hashlib.sha256(item.key.encode()).hexdigest()] == item.key_prefix
        assert item.key_prefix == item.key[: len(PREFIX) + DISPLAY_CHARS]
    assert len(set(bodies)) == 1000
    # Every one of the 256 bits is a fair coin: about 500 of 1,000 keys have it set (a bit stuck
    # at 0 or 1, or a narrow alphabet, lands far outside; 6.3 standard deviations each side).
    for bit in range(256):
        ones = sum((body[bit // 8] >> (bit % 8)) & 1 for body in bodies)
        assert 400 <= ones <= 600, (bit, ones)
    # No two keys share a long start (a time- or counter-based key would).
    hexes = sorted(body.hex() for body in bodies)
    longest = max(shared_start(a, b) for a, b in itertools.pairwise(hexes))
    assert longest <= 12, longest


def shared_start(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def test_keys_come_from_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key body is exactly what a `secrets` call returned for 32 bytes."""
    calls: list[tuple[str, int | None, object]] = []
    depth = [0]  # token_hex calls token_bytes: only the outermost call is the caller's

    def spy(name: str) -> Callable[..., object]:
        real = getattr(secrets, name)

        def call(nbytes: int | None = None) -> object:
            depth[0] += 1
            try:
                result = real(nbytes)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                calls.append((name, nbytes, result))
            return result

        return call

    for name in ("token_bytes", "token_hex", "token_urlsafe"):
        monkeypatch.setattr(secrets, name, spy(name))
    key = app_keys.generate_key(PREFIX)
    assert len(calls) == 1, calls
    name, nbytes, result = calls[0]
    assert nbytes == 32
    produced = result.hex() if isinstance(result, bytes) else result
    assert key == PREFIX + produced


def test_the_plain_key_exists_only_in_create_api_keys_output(
    api: ApiProcess, pglog: PostgresLog
) -> None:
    email = "only-once@example.com"
    result = run_cli(
        "create_api_key", email, "pro", "--name", "laptop", env=api.env, cwd=api.workdir
    )
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert result.stdout == key + "\n"  # alone on stdout, for scripts
    assert re.fullmatch(r"sk_[0-9a-f]{64}", key)
    assert not leaked(result.stderr, key), result.stderr
    assert key[: len(PREFIX) + DISPLAY_CHARS] in result.stderr  # the display prefix is shown

    # Use it every way a client can: success, errors, OpenAI endpoints.
    with api.client(key) as client:
        assert client.post("/v1/embed", json={"text": "only once"}).status_code == 200
        assert client.post("/v1/embed", json={"text": 7}).status_code == 400
        assert client.get("/v1/embed").status_code == 405
        assert client.get("/v1/models").status_code == 200
        assert (
            client.post(
                "/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": ["a", "b"]}
            ).status_code
            == 200
        )
        # A key in a header where it does not belong is not echoed either.
        misplaced = client.post("/v1/embed", json={"text": "x"}, headers={"X-Api-Key": key})
        assert misplaced.status_code == 200
    wait_for_usage(api.env["DATABASE_URL"], email)  # so `api usage` has the key to show
    outputs = {
        "api keys list": run_cli("api", "keys", "list", email, env=api.env, cwd=api.workdir),
        "api usage": run_cli("api", "usage", email, env=api.env, cwd=api.workdir),
    }
    for name, output in outputs.items():
        assert output.returncode == 0, (name, output.stderr)
        assert key[: len(PREFIX) + DISPLAY_CHARS] in output.stdout, (name, output.stdout)
        assert not leaked(output.stdout + output.stderr, key), name

    places = {
        "the api log": api.logs(),
        "the PostgreSQL log": pglog.text(),
        "the database": database_dump(api.env["DATABASE_URL"]),
        "Redis": redis_dump(api.env["REDIS_URL"], api.env["REDIS_KEY_PREFIX"]),
    }
    for place, text in places.items():
        assert not leaked(text, key), place
    # The database does hold its hash (so the scan above looked in the right place).
    assert hash_key(key) in places["the database"]


def wait_for_usage(database_url: str, email: str) -> None:
    """The ledger is written in the background, about once a second."""
    deadline = time.monotonic() + 15
    with psycopg.connect(database_url, autocommit=True) as conn:
        while not conn.execute(
            "SELECT 1 FROM usage JOIN users u ON u.id = usage.user_id WHERE u.email = %s", (email,)
        ).fetchone():
            assert time.monotonic() < deadline, f"no usage recorded for {email}"
            time.sleep(0.1)


# --- 3. Unknown-key floods are cheap ---------------------------------------------------------


def _flood_process(port: int, requests: int, concurrency: int, started: Any, results: Any) -> None:
    """The flooder, in a process of its own so its work does not slow the valid user's requests
    in the test process. Reports how many answers of each kind came back."""
    results.put(asyncio.run(_flood(port, requests, concurrency, started)))


async def _unknown_key_request(port: int) -> tuple[int, str, bool]:
    """POST /v1/embed with a random key on a connection of its own (the service closes it after
    a 401 anyway); the answer as (status, error code, JSON envelope?). Raw HTTP/1.1 on asyncio
    streams: the flooder's CPU goes to requests, not to a client library, on a machine of two
    cores shared with the service."""
    body = b'{"text": "let me in"}'
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /v1/embed HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n"
            b"Authorization: Bearer %s\r\n\r\n%s" % (len(body), random_key().encode(), body)
        )
        status_line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines if line)
        }
        content = await reader.readexactly(int(headers.get("content-length", "0")))
    finally:
        writer.close()
    try:
        answer = json.loads(content)
        code = answer.get("error", "")
        envelope = set(answer) == {"error", "message"} and bool(answer["message"])
    except ValueError:
        code, envelope = "", False
    json_type = headers.get("content-type", "").startswith("application/json")
    return int(status_line.split()[1]), code, envelope and json_type


async def _flood(port: int, requests: int, concurrency: int, started: Any) -> dict:
    """`requests` random keys from `concurrency` connections, each sending the next as soon as
    the last is answered."""
    answers: Counter[tuple[int, str, bool]] = Counter()

    async def sender(count: int) -> None:
        for _ in range(count):
            answers[await _unknown_key_request(port)] += 1
            if not started.is_set():
                started.set()

    shares = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
    started_at = time.perf_counter()
    await asyncio.gather(*(sender(share) for share in shares))
    return {"answers": dict(answers), "seconds": time.perf_counter() - started_at}


async def _trickle(port: int, requests: int, per_second: float) -> dict:
    """`requests` random keys sent on a schedule, `per_second` of them a second whatever the
    answers do, as from many independent clients."""
    started_at = time.perf_counter()
    sending = []
    for i in range(requests):
        await asyncio.sleep(max(0.0, started_at + i / per_second - time.perf_counter()))
        sending.append(asyncio.create_task(_unknown_key_request(port)))
    answers = Counter(await asyncio.gather(*sending))
    return {"answers": dict(answers), "seconds": time.perf_counter() - started_at}


def probe(client: httpx.Client, key: str, until: Callable[[list[float]], bool]) -> list[float]:
    """The valid user: an embed every PROBE_PAUSE (a text the cache holds), each timed, in ms."""
    times: list[float] = []
    while not until(times):
        started = time.perf_counter()
        response = embed(client, key, "the valid user's sentence")
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, response.text
        time.sleep(PROBE_PAUSE)
    return times


def test_a_flood_of_random_keys_is_cheap(
    api: ApiProcess, scale_key: str, pglog: PostgresLog, record_property
) -> None:
    test_started = time.perf_counter()
    with api.client() as client:
        embed(client, scale_key, "the valid user's sentence")  # warm: cached key and text
        alone = probe(client, scale_key, lambda times: len(times) >= PROBE_ALONE)

        context = multiprocessing.get_context("spawn")
        started, results = context.Event(), context.Queue()
        flooder = context.Process(
            target=_flood_process,
            args=(api.port, FLOOD_REQUESTS, FLOOD_CONCURRENCY, started, results),
        )
        queries_before = lookup_queries(api)
        log_start = pglog.sync()
        flooder.start()
        try:
            assert started.wait(60), "the flood never got an answer"
            under_flood = probe(
                client, scale_key, lambda _: not results.empty() or not flooder.is_alive()
            )
            try:
                outcome = results.get(timeout=60)
            except queue.Empty:
                raise AssertionError(f"the flooder died: exit {flooder.exitcode}") from None
        finally:
            flooder.join(30)
            if flooder.is_alive():
                flooder.kill()
        log_end = pglog.sync()
        queries = lookup_queries(api) - queries_before

    p50_alone, p50_flood = statistics.median(alone), statistics.median(under_flood)
    factor = p50_flood / p50_alone
    logged = len(lookups(pglog.statements(log_start, log_end)))
    report = (
        f"flood of {FLOOD_REQUESTS} random keys ({FLOOD_CONCURRENCY} connections) in "
        f"{outcome['seconds']:.1f} s: {queries:.0f} lookup queries (PostgreSQL logged {logged}); "
        f"valid user p50 {p50_alone:.2f} ms alone ({len(alone)} requests), "
        f"{p50_flood:.2f} ms under the flood ({len(under_flood)} requests): x{factor:.1f}; "
        f"test {time.perf_counter() - test_started:.1f} s"
    )
    print(f"\n{report}")
    record_property("flood", report)

    assert outcome["answers"] == {(401, "invalid_api_key", True): FLOOD_REQUESTS}
    assert 1 <= queries <= MAX_FLOOD_QUERIES, report
    # PostgreSQL agrees with the service's own count (the metric is not what is being trusted).
    assert logged == queries, report
    assert api.process is not None and api.process.poll() is None
    assert httpx.get(f"{api.base_url}/health", timeout=10).status_code == 200
    with api.client() as client:
        assert embed(client, scale_key, "after the flood").status_code == 200


def test_random_keys_arriving_apart_are_batched_too(api: ApiProcess, pglog: PostgresLog) -> None:
    """Keys that arrive a little apart, as from many slow clients, not in one burst.

    Coalescing only what arrives during the previous query gave these one query each (the
    service answers each before the next arrives); lookups now start at most every 20 ms."""
    before, log_start = lookup_queries(api), pglog.sync()
    outcome = asyncio.run(_trickle(api.port, TRICKLE_REQUESTS, TRICKLE_RATE))
    queries, log_end = lookup_queries(api) - before, pglog.sync()
    logged = len(lookups(pglog.statements(log_start, log_end)))
    report = (
        f"{TRICKLE_REQUESTS} random keys, {TRICKLE_RATE} a second, in "
        f"{outcome['seconds']:.1f} s: {queries:.0f} lookup queries (PostgreSQL logged {logged})"
    )
    print(f"\n{report}")
    assert outcome["answers"] == {(401, "invalid_api_key", True): TRICKLE_REQUESTS}
    assert 1 <= queries <= TRICKLE_REQUESTS / 2, report
    assert logged == queries, report


# --- 4. Response headers ---------------------------------------------------------------------


def assert_security_headers(response: httpx.Response, what: str) -> None:
    headers = response.headers
    assert headers.get("x-content-type-options") == "nosniff", (what, dict(headers))
    assert headers.get("cache-control") == "no-store", (what, dict(headers))
    assert "server" not in headers, (what, headers.get("server"))
    assert "x-powered-by" not in headers, what


def served_routes() -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, HEAD included, from its own route table
    (a route added later is checked without anyone remembering to). A path parameter gets a
    value that names nothing: the answer to that must carry the headers too."""
    app = create_app(Settings(database_url="postgresql:///unused", redis_url="redis://unused"))
    served = []
    for route in app.routes:
        if isinstance(route, Route):
            path = re.sub(r"\{[^}]*\}", NOTHING, route.path)
            served += [(method, path) for method in sorted(route.methods or ())]
        elif isinstance(route, Mount):
            served.append(("GET", f"{route.path.rstrip('/')}/{NOTHING}"))
    return served


NOTHING = "no-such-thing"
REQUEST_BODIES = {
    "/v1/embed": {"text": "headers"},
    "/v1/embeddings": {"model": "all-MiniLM-L6-v2", "input": "headers"},
}


@pytest.mark.parametrize(("method", "path"), served_routes())
def test_every_route_sends_the_security_headers(
    api: ApiProcess, scale_key: str, method: str, path: str
) -> None:
    with api.client(scale_key) as client:
        body = REQUEST_BODIES.get(path, {}) if method == "POST" else None
        response = client.request(method, path, json=body)
        options = client.request("OPTIONS", path)
    if NOTHING not in path:
        assert response.status_code < 400, (method, path, response.status_code, response.text)
    assert_security_headers(response, f"{method} {path}")
    assert_security_headers(options, f"OPTIONS {path}")


def test_errors_send_the_security_headers(api: ApiProcess, scale_key: str) -> None:
    free_key = create_key(api.env, api.workdir, "limited@example.com", "free")
    with api.client(scale_key) as client:
        answers = {
            "400": client.post("/v1/embed", json={"text": 7}),
            "401": client.post("/v1/embed", json={"text": "x"}, headers={"Authorization": ""}),
            "401 openai": client.post(
                "/v1/embeddings", json={"input": "x"}, headers={"Authorization": "Bearer no"}
            ),
            "404": client.get("/no/such/path"),
            "405": client.delete("/v1/embed"),
            "413": client.post("/v1/embed", content=b"x" * (2 * 1024 * 1024)),
            "wrong content type": client.post(
                "/v1/embed", content=b"text", headers={"Content-Type": "text/plain"}
            ),
        }
        for _ in range(FREE_TIER_LIMIT):
            assert embed(client, free_key, "within the quota").status_code == 200
        answers["429"] = embed(client, free_key, "over the quota")
    for what, response in answers.items():
        expected = what.split()[0]
        if expected.isdigit():
            assert response.status_code == int(expected), (what, response.text)
        else:
            assert 400 <= response.status_code < 500, (what, response.text)
        assert response.headers["content-type"].startswith("application/json"), what
        assert_security_headers(response, what)


def test_no_server_banner_even_on_http_level_errors(api: ApiProcess) -> None:
    """A request hypercorn rejects itself (the app never sees it) names no server either."""
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    head = answer.split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 4"), answer
    assert b"\r\nserver:" not in head, answer
