"""One customer cannot hurt another: each abuse made real against the real service (PostgreSQL,
Redis, model), with the per-minute limits as shipped.

Nothing here times an answer: what is asserted is who was answered first, what was refused
before any work, what was dropped, and what was counted."""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import orjson
import psycopg
import pytest

from app.config import TIERS
from tests.helpers import ApiProcess, create_key

WORDS = (Path(__file__).resolve().parents[2] / "bench" / "words.txt").read_text().split()


def words(count: int, seed: int) -> str:
    return " ".join(WORDS[(seed * 7919 + i * 104729) % len(WORDS)] for i in range(count))


def shipped(env: dict[str, str]) -> dict[str, str]:
    """The env with the per-minute limits back at their shipped defaults."""
    limits = {f"{tier.upper()}_TIER_{window}" for tier in TIERS for window in ("RPM", "TPM")}
    return {name: value for name, value in env.items() if name not in limits}


@pytest.fixture(scope="module")
def service(module_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    process = ApiProcess(shipped(module_env), tmp_path_factory.mktemp("abuse")).start()
    try:
        process.wait_healthy()
        yield process
    finally:
        process.stop()


def metric(api: ApiProcess, name: str, **labels: str) -> float:
    text = httpx.get(f"{api.base_url}/metrics").text
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{name}{{{selector}}} (\S+)$" if labels else rf"^{name} (\S+)$"
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else 0.0


def ledger(api: ApiProcess, email: str) -> int:
    with psycopg.connect(api.env["DATABASE_URL"]) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(embeddings_count), 0) FROM usage u JOIN users s"
            " ON s.id = u.user_id WHERE s.email = %s",
            (email,),
        ).fetchone()
    return int(row[0])


def wait_ledger(api: ApiProcess, email: str, expected: int, timeout: float = 15) -> int:
    """The user's ledger sum once it reaches `expected` (rows are written in the background)."""
    deadline = time.monotonic() + timeout
    while (total := ledger(api, email)) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return total


def test_a_free_flood_of_megabyte_requests_is_refused_unread_and_then_limited(
    service: ApiProcess,
) -> None:
    key = create_key(service.env, service.workdir, "flood@example.com", "free")
    flood = {"model": "all-MiniLM-L6-v2", "input": [words(2_500, i)[:10_000] for i in range(100)]}
    body = orjson.dumps(flood)
    assert len(body) > 1_000_000 - 20_000
    tokens_before = metric(service, "smally_token_count_count")
    with service.client(key) as client:
        answers = [client.post("/v1/embeddings", content=body) for _ in range(61)]
    refused, limited = answers[:60], answers[60]
    for answer in refused:
        error = answer.json()["error"]
        assert answer.status_code == 400 and error["code"] == "text_too_long", answer.text
        assert error["param"] == "input[0]"  # refused at the first text, by counting its pieces
        assert "more than 128 tokens" in error["message"]
    # Every authenticated request counts against the minute, refused ones too: 60 for free.
    assert limited.status_code == 429
    error = limited.json()["error"]
    assert error["code"] == "rate_limited" and error["type"] == "requests"
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert limited.headers["x-ratelimit-limit-requests"] == "60"
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused[0].headers["x-ratelimit-remaining-requests"] == "59"
    # Nothing was embedded, tokenized or billed.
    assert metric(service, "smally_token_count_count") == tokens_before
    assert ledger(service, "flood@example.com") == 0
    assert metric(service, "smally_per_minute_limited_total", tier="free", window="requests") >= 1


def test_the_smally_envelope_says_which_window_and_when(service: ApiProcess) -> None:
    key = create_key(service.env, service.workdir, "minute@example.com", "free")
    with service.client(key) as client:
        answers = [client.post("/v1/embed", json={"text": f"text {i}"}) for i in range(61)]
    assert [a.status_code for a in answers] == [200] * 60 + [429]
    body = answers[60].json()
    assert body["error"] == "rate_limited" and body["window"] == "requests"
    assert body["limit"] == 60 and "retry after" in body["message"]
    assert answers[0].headers["x-ratelimit-limit-tokens"] == "20000"
    assert wait_ledger(service, "minute@example.com", 60) == 60


def test_a_2048_input_batch_does_not_hold_a_single_request_behind_it(service: ApiProcess) -> None:
    big_key = create_key(service.env, service.workdir, "big@example.com", "pro")
    victim_key = create_key(service.env, service.workdir, "victim@example.com", "pro")
    batch = {"model": "all-MiniLM-L6-v2", "input": [words(16, 10_000 + i) for i in range(2048)]}
    finished: list[str] = []
    results: dict[str, httpx.Response] = {}

    def send_big() -> None:
        with service.client(big_key) as client:
            client.timeout = httpx.Timeout(300)
            results["big"] = client.post("/v1/embeddings", json=batch)
        finished.append("big")

    passes_before = metric(service, "smally_inference_latency_seconds_count")
    big = threading.Thread(target=send_big)
    big.start()
    deadline = time.monotonic() + 60
    while metric(service, "smally_inference_latency_seconds_count") < passes_before + 3:
        assert time.monotonic() < deadline and big.is_alive(), "the big batch never started"
        time.sleep(0.05)
    with service.client(victim_key) as client:
        results["victim"] = client.post("/v1/embed", json={"text": "a single short text"})
    finished.append("victim")
    big.join(timeout=300)
    assert finished == ["victim", "big"]
    assert results["victim"].status_code == 200
    assert results["big"].status_code == 200 and len(results["big"].json()["data"]) == 2048


def test_work_of_a_client_that_left_is_dropped_and_never_billed(service: ApiProcess) -> None:
    key = create_key(service.env, service.workdir, "leaver@example.com", "pro")
    body = orjson.dumps(
        {"model": "all-MiniLM-L6-v2", "input": [words(60, 20_000 + i) for i in range(1500)]}
    )
    dropped_before = metric(service, "smally_abandoned_total", stage="inference")
    passes_before = metric(service, "smally_inference_latency_seconds_count")
    host, port = service.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as client:
        client.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: smally\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 60
        while metric(service, "smally_inference_latency_seconds_count") < passes_before + 2:
            assert time.monotonic() < deadline, "the request never reached the model"
            time.sleep(0.05)
    # The client is gone: what it asked for stops within a pass, and nothing is billed.
    deadline = time.monotonic() + 60
    while metric(service, "smally_abandoned_total", stage="inference") == dropped_before:
        assert time.monotonic() < deadline, "the left client's rows were not dropped"
        time.sleep(0.05)
    dropped = metric(service, "smally_abandoned_total", stage="inference") - dropped_before
    assert dropped > 500  # most of the 1,500 rows never ran
    assert metric(service, "smally_errors_total", error="client_gone") >= 1
    assert any(r.get("status") == 499 for r in service.log_records())
    time.sleep(2)  # past the ledger's flush interval: a row would be there by now
    assert ledger(service, "leaver@example.com") == 0


def test_the_per_minute_limit_holds_across_two_processes(
    module_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    env = {**shipped(module_env), "FREE_TIER_RPM": "10"}
    first = ApiProcess(env, tmp_path_factory.mktemp("first")).start()
    second = ApiProcess(env, tmp_path_factory.mktemp("second")).start()
    try:
        first.wait_healthy()
        second.wait_healthy()
        key = create_key(env, first.workdir, "two@example.com", "free")
        statuses = []
        for i in range(20):
            with (first, second)[i % 2].client(key) as client:
                statuses.append(client.post("/v1/embed", json={"text": f"t {i}"}).status_code)
        assert statuses == [200] * 10 + [429] * 10
        # The official client waits for Retry-After (6 s: one request per 60 / 10 s) and retries.
        refusals = sum(r.get("status") == 429 for r in first.log_records())
        retrying = openai.OpenAI(base_url=f"{first.base_url}/v1", api_key=key, max_retries=2)
        result = retrying.embeddings.create(model="all-MiniLM-L6-v2", input="after the wait")
        assert len(result.data[0].embedding) == 384
        # It was refused first, and its retry was served.
        assert sum(r.get("status") == 429 for r in first.log_records()) == refusals + 1
    finally:
        first.stop()
        second.stop()
