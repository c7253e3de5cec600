"""The published contract: /openapi.json declares exactly what the app serves, and the running
service keeps it under schemathesis' generated requests (with a valid key and with none).

`make test` runs a bounded fuzz (FUZZ_EXAMPLES, 100 per operation by default); `make fuzz` runs
the same tests with 1,000. Per-operation case counts go to .artifacts/fuzz-*.json.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess

import httpx
import pytest
from openapi_spec_validator import validate
from starlette.routing import Route

from app.config import Settings
from app.http.app import create_app
from tests.helpers import BIN, REPO, ApiProcess, create_key

ARTIFACTS = REPO / ".artifacts"
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))


@pytest.fixture(scope="module")
def scale_key(api: ApiProcess) -> str:
    return create_key(api.env, api.workdir, "fuzz@example.com", "scale")


@pytest.fixture(scope="module")
def document(api: ApiProcess) -> dict:
    response = httpx.get(f"{api.base_url}/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    return response.json()


def test_document_is_valid_openapi_3_1(document: dict) -> None:
    assert document["openapi"].startswith("3.1")
    validate(document)  # raises on anything that is not OpenAPI 3.1


def test_document_declares_exactly_the_routes_the_app_serves(document: dict) -> None:
    app = create_app(Settings(database_url="postgresql://unused", redis_url="redis://unused"))
    served: dict[str, set[str]] = {}
    for route in app.routes:
        assert isinstance(route, Route), route  # a Mount would need declaring by hand
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)  # {asset:path} is {asset}
        served[path] = {m.lower() for m in route.methods or ()} - {"head"}
    declared = {path: set(operations) for path, operations in document["paths"].items()}
    assert declared == served


def test_every_operation_documents_its_errors_and_auth(document: dict) -> None:
    public = {"/", "/health", "/metrics", "/openapi.json", "/docs"}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if path in public or path == "/docs/{asset}":
                assert operation["security"] == [], (method, path)
                continue
            assert "security" not in operation  # the document-wide bearer scheme applies
            assert "401" in operation["responses"], (method, path)
            assert "503" in operation["responses"], (method, path)
            if method == "post":
                for status in ("400", "408", "413", "415", "429"):
                    assert status in operation["responses"], (method, path, status)
                headers = operation["responses"]["200"]["headers"]
                assert "X-RateLimit-Limit" in headers


def test_documented_limits_are_the_enforced_ones(
    api: ApiProcess, scale_key: str, document: dict
) -> None:
    """The limits in the document are the ones the server applies, checked at their edges."""
    body = document["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]
    schema = body["application/json"]["schema"]["properties"]
    max_items = schema["input"]["oneOf"][1]["maxItems"]
    max_dimensions = schema["dimensions"]["maximum"]
    model = schema["model"]["enum"][0]
    with api.client(scale_key) as client:
        too_many = client.post(
            "/v1/embeddings", json={"model": model, "input": ["a"] * (max_items + 1)}
        )
        assert too_many.status_code == 400
        assert too_many.json()["error"]["param"] == "input"
        widest = client.post(
            "/v1/embeddings", json={"model": model, "input": "a", "dimensions": max_dimensions}
        )
        assert widest.status_code == 200
        assert len(widest.json()["data"][0]["embedding"]) == max_dimensions
        too_wide = client.post(
            "/v1/embeddings", json={"model": model, "input": "a", "dimensions": max_dimensions + 1}
        )
        assert too_wide.status_code == 400


def run_schemathesis(api: ApiProcess, name: str, *headers: str) -> dict[str, int]:
    """One schemathesis run with every check; returns the cases generated per operation."""
    ARTIFACTS.mkdir(exist_ok=True)
    events = api.workdir / f"fuzz-{name}.ndjson"
    command = [
        str(BIN / "st"),
        "run",
        f"{api.base_url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        str(FUZZ_EXAMPLES),
        "--continue-on-failure",
        "--request-timeout",
        "30",
        "--generation-database",
        "none",
        "--report",
        "ndjson",
        "--report-ndjson-path",
        str(events),
        *[arg for header in headers for arg in ("--header", header)],
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=api.workdir,  # schemathesis keeps state in ./.schemathesis
        env={**os.environ, "NO_COLOR": "1"},
    )
    cases: collections.Counter[str] = collections.Counter()
    for line in events.read_text().splitlines():
        event = json.loads(line)
        if "ScenarioFinished" in event:
            recorder = event["ScenarioFinished"]["recorder"]
            cases[recorder["label"]] += len(recorder.get("cases", {}))
    summary = {"examples_per_operation": FUZZ_EXAMPLES, "cases": dict(sorted(cases.items()))}
    (ARTIFACTS / f"fuzz-{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"schemathesis ({name}): {sum(cases.values())} cases: {summary['cases']}")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    return cases


def assert_service_unharmed(api: ApiProcess) -> None:
    assert api.process is not None and api.process.poll() is None
    assert httpx.get(f"{api.base_url}/health").status_code == 200
    records = api.log_records()
    assert not [r for r in records if r.get("status", 0) >= 500]
    assert not [r for r in records if r.get("level") in ("error", "critical")]


def test_fuzz_with_a_valid_key(api: ApiProcess, scale_key: str) -> None:
    cases = run_schemathesis(api, "with-key", f"Authorization: Bearer {scale_key}")
    assert cases["POST /v1/embed"] >= FUZZ_EXAMPLES
    assert cases["POST /v1/embeddings"] >= FUZZ_EXAMPLES
    assert_service_unharmed(api)


def test_fuzz_without_a_key(api: ApiProcess) -> None:
    cases = run_schemathesis(api, "no-key")
    assert cases["POST /v1/embeddings"] >= FUZZ_EXAMPLES
    assert_service_unharmed(api)


def test_fuzz_with_a_wrong_key(api: ApiProcess) -> None:
    cases = run_schemathesis(api, "wrong-key", f"Authorization: Bearer sk_{'0' * 64}")
    assert cases["POST /v1/embed"] >= FUZZ_EXAMPLES
    assert_service_unharmed(api)
