"""The rehearsal's checks from outside the VM, through nginx (standard library only).

    python3 rehearsal/check_http.py CHECK --https https://127.0.0.1:PORT --http http://127.0.0.1:PORT
        --ca cert.pem [--key sk_...] [--reference ref.json]

CHECK is one of:
  health     /health through nginx (HTTPS) answers 200 with {"status": "healthy"} alone: the
             build and the stores are for callers on the server itself
  embed      /v1/embed through nginx returns every reference vector (cosine >= 0.99999) and its
             token count
  key-ok     the key is accepted (200); key-refused: the key is refused (401)
  headers    the security headers, HSTS included, are on the answers
  burst      a burst beyond the limit_req rate on /v1/ gets 429 from nginx, each as JSON
             ("rate_limited") with Retry-After
  metrics    /metrics through nginx from outside the machine is refused (403)
  too-large  a body a little over --max-bytes gets the service's own 413 (payload_too_large,
             max_bytes; needs --key), one far beyond it nginx's 413 as JSON, in the service's
             envelope on /v1/embed and OpenAI's on /v1/embeddings
  down       with the service stopped: nginx's 502 as JSON (upstream_unavailable), in each
             envelope
  http       port 80 redirects to HTTPS, and serves ACME challenges (--acme-token NAME:CONTENT)
  quota      --count requests at once (--parallel), each a different text, with --key: prints
             "200s=<a> 429s=<b> other=<c>" (a cluster's exactness: a = the key's monthly limit)
  load       steady load until --stop-file exists: --workers clients POST /v1/embed with --key,
             --rate requests/s in all (under nginx's limit_req); every answer but a 200, and
             every connection error, is a failure. Prints "<n> requests, <f> failed, slowest
             <s> s, releases <names>" (the releases /health named meanwhile, in the order
             first seen, as read by each --release-command: a command that prints the
             service's /health answers one a line, read on its own machine, since through
             nginx /health names no release); exit 1 if f > 0
Exit status 0 when the check passes; one line says what was seen.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import math
import os
import shlex
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from email.message import Message
from pathlib import Path

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'",
    "Strict-Transport-Security": "max-age=",
}


class Answer:
    def __init__(self, status: int, headers: Message, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> dict:
        return json.loads(self.body)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None


def request(
    url: str,
    ca: str | None,
    *,
    data: dict | None = None,
    key: str | None = None,
    timeout: float = 30,
) -> Answer:
    headers = {"User-Agent": "smally-rehearsal"}
    body = None
    if data is not None:
        body = json.dumps(data).encode()
        headers["Content-Type"] = "application/json"
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=body, headers=headers)
    handlers: list[urllib.request.BaseHandler] = [NoRedirect()]
    if url.startswith("https:"):
        handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca)))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(req, timeout=timeout) as resp:
            return Answer(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, exc.headers, exc.read())


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def fail(message: str) -> int:
    print(f"FAIL {message}")
    return 1


def ok(message: str) -> int:
    print(f"ok   {message}")
    return 0


def check_health(args: argparse.Namespace) -> int:
    answer = request(f"{args.https}/health", args.ca)
    body = answer.json() if answer.status in (200, 503) else None
    if answer.status != 200 or body != {"status": "healthy"}:
        return fail(f"/health through nginx: {answer.status} {answer.body[:200]!r}")
    return ok(f"/health through nginx (HTTPS, certificate verified): 200 {body}, no build")


def check_embed(args: argparse.Namespace) -> int:
    cases = json.loads(Path(args.reference).read_text())["cases"]
    worst = 1.0
    for case in cases:
        answer = request(
            f"{args.https}/v1/embed", args.ca, data={"text": case["text"]}, key=args.key
        )
        if answer.status != 200:
            return fail(f"/v1/embed {case['text']!r}: {answer.status} {answer.body[:200]!r}")
        body = answer.json()
        similarity = cosine(body["embedding"], case["embedding"])
        worst = min(worst, similarity)
        if similarity < 0.99999 or body["tokens"] != case["tokens"]:
            return fail(
                f"/v1/embed {case['text']!r}: cosine {similarity:.7f}, "
                f"tokens {body['tokens']} (reference {case['tokens']})"
            )
        time.sleep(0.15)  # stay under the limit_req rate: this check is not the burst check
    return ok(f"/v1/embed through nginx: {len(cases)} reference vectors, lowest cosine {worst:.7f}")


def check_key(args: argparse.Namespace, expected: int) -> int:
    answer = request(f"{args.https}/v1/embed", args.ca, data={"text": "still here?"}, key=args.key)
    if answer.status != expected:
        return fail(f"key {args.key[:11]}...: {answer.status}, expected {expected}")
    return ok(f"key {args.key[:11]}...: {answer.status} as expected")


def check_headers(args: argparse.Namespace) -> int:
    seen = []
    for path in ("/health", "/v1/embed", "/no-such-page", "/docs"):
        answer = request(f"{args.https}{path}", args.ca)
        for name, fragment in SECURITY_HEADERS.items():
            values = answer.headers.get_all(name) or []
            if len(values) != 1 or fragment not in values[0]:
                return fail(f"{path} ({answer.status}): header {name} is {values!r}")
        # The docs page keeps the application's own policy, which lets its scripts load.
        if path == "/docs" and (
            answer.status != 200
            or "script-src 'self'" not in answer.headers["Content-Security-Policy"]
        ):
            return fail(f"/docs ({answer.status}): {answer.headers['Content-Security-Policy']!r}")
        if "nginx/" in answer.headers.get("Server", ""):
            return fail(f"{path}: Server header names the nginx version")
        seen.append(f"{path} {answer.status}")
    return ok(f"security headers and HSTS on {', '.join(seen)}")


def check_burst(args: argparse.Namespace) -> int:
    def one(_: int) -> Answer:
        return request(f"{args.https}/v1/embed", args.ca, data={"text": "burst"})

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.parallel) as pool:
        answers = list(pool.map(one, range(args.count)))
    statuses = [answer.status for answer in answers]
    counts = {status: statuses.count(status) for status in sorted(set(statuses))}
    limited = counts.get(429, 0) + counts.get(503, 0)
    # Without a key the application answers 401: those requests got through nginx's limit.
    if limited == 0 or counts.get(401, 0) == 0:
        return fail(f"burst of {args.count} on /v1/: {counts}")
    for answer in answers:
        if answer.status == 429 and not edge_rate_limited(answer):
            headers = dict(answer.headers.items())
            return fail(f"nginx's 429 on /v1/: {answer.body[:200]!r} {headers}")
    return ok(f"burst of {args.count} on /v1/: {counts} (limit_req at work; its 429s JSON)")


def posted(args: argparse.Namespace, path: str, length: int) -> Answer:
    """A POST of `length` spaces (not JSON: nginx refuses it for its size before anyone reads
    it), without a key."""
    url = urllib.parse.urlsplit(args.https)
    context = ssl.create_default_context(cafile=args.ca)
    connection = http.client.HTTPSConnection(url.hostname, url.port, context=context, timeout=30)
    try:
        connection.request(
            "POST", path, body=b" " * length, headers={"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        connection.close()


def edge_error(answer: Answer, status: int, code: str, openai: bool) -> str | None:
    """What is wrong with `answer` as nginx's own `status` in its envelope; None if nothing."""
    try:
        body = answer.json()
    except ValueError:
        body = None
    if openai:
        error = body.get("error") if isinstance(body, dict) else None
        found = error.get("code") if isinstance(error, dict) else None
        shaped = isinstance(error, dict) and {"message", "type", "param"} <= error.keys()
    else:
        found = body.get("error") if isinstance(body, dict) else None
        shaped = isinstance(body, dict) and "message" in body
    if (
        answer.status != status
        or answer.headers.get("Content-Type") != "application/json"
        or found != code
        or not shaped
    ):
        return f"{answer.status} {answer.headers.get('Content-Type')} {answer.body[:200]!r}"
    return None


def check_too_large(args: argparse.Namespace) -> int:
    over = args.max_bytes + 100
    text = "x" * (over - len('{"text": ""}'))
    answer = request(f"{args.https}/v1/embed", args.ca, data={"text": text}, key=args.key)
    body = answer.json() if answer.status == 413 else {}
    if body.get("error") != "payload_too_large" or body.get("max_bytes") != args.max_bytes:
        return fail(f"{over} bytes: {answer.status} {answer.body[:200]!r}")
    seen = [f"{over} bytes: the service's 413 (max_bytes {args.max_bytes})"]
    far = args.max_bytes + 65536 + 1  # past nginx's client_max_body_size
    for path, openai in (("/v1/embed", False), ("/v1/embeddings", True)):
        wrong = edge_error(posted(args, path, far), 413, "payload_too_large", openai)
        if wrong:
            return fail(f"{far} bytes to {path}: {wrong}")
        seen.append(f"{far} bytes to {path}: nginx's JSON 413")
    return ok("; ".join(seen))


def check_down(args: argparse.Namespace) -> int:
    seen = []
    for path, openai in (("/v1/embed", False), ("/v1/embeddings", True)):
        answer = request(f"{args.https}{path}", args.ca, data={"text": "anyone?"})
        wrong = edge_error(answer, 502, "upstream_unavailable", openai)
        if wrong:
            return fail(f"{path} with the service stopped: {wrong}")
        seen.append(f"{path} 502 {'OpenAI' if openai else 'Smally'} envelope")
    return ok(f"the service stopped, nginx answers JSON: {', '.join(seen)}")


def edge_rate_limited(answer: Answer) -> bool:
    """nginx's own 429: JSON in the service's envelope, code rate_limited, with Retry-After."""
    try:
        body = answer.json()
    except ValueError:
        return False
    return (
        answer.headers.get("Content-Type") == "application/json"
        and isinstance(body, dict)
        and body.get("error") == "rate_limited"
        and bool(answer.headers.get("Retry-After"))
    )


def check_quota(args: argparse.Namespace) -> int:
    start = threading.Barrier(args.parallel)

    def one(index: int) -> int:
        if index < args.parallel:
            start.wait()  # the first wave leaves together
        try:
            data = {"text": f"quota check {index} {os.getpid()}"}
            return request(f"{args.https}/v1/embed", args.ca, data=data, key=args.key).status
        except OSError:
            return 0

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.parallel) as pool:
        statuses = list(pool.map(one, range(args.count)))
    counted = {200: statuses.count(200), 429: statuses.count(429)}
    other = len(statuses) - counted[200] - counted[429]
    line = f"200s={counted[200]} 429s={counted[429]} other={other}"
    return ok(line) if other == 0 else fail(line)


def check_metrics(args: argparse.Namespace) -> int:
    answer = request(f"{args.https}/metrics", args.ca)
    if answer.status != 403:
        return fail(f"/metrics from outside: {answer.status} {answer.body[:100]!r}")
    return ok("/metrics through nginx from outside: 403")


def check_http(args: argparse.Namespace) -> int:
    answer = request(f"{args.http}/health", None)
    location = answer.headers.get("Location", "")
    if answer.status != 301 or not location.startswith("https://"):
        return fail(f"port 80 /health: {answer.status} Location {location!r}")
    name, _, content = args.acme_token.partition(":")
    answer = request(f"{args.http}/.well-known/acme-challenge/{name}", None)
    if answer.status != 200 or answer.body.decode().strip() != content:
        return fail(f"ACME challenge over HTTP: {answer.status} {answer.body[:100]!r}")
    return ok("port 80: 301 to HTTPS, ACME challenge served")


def check_load(args: argparse.Namespace) -> int:
    if not args.stop_file:
        return fail("load needs --stop-file")
    interval = args.workers / args.rate  # each worker's time between two starts
    lock = threading.Lock()
    done: list[float] = []  # each 200's duration
    failures: list[str] = []
    releases: list[str] = []

    def worker(index: int) -> None:
        text = f"steady load from worker {index}"
        while not os.path.exists(args.stop_file):
            started = time.monotonic()
            try:
                # Long enough for a request that waits out a restart in the socket's queue.
                url = f"{args.https}/v1/embed"
                answer = request(url, args.ca, data={"text": text}, key=args.key, timeout=120)
                failed = None if answer.status == 200 else f"{answer.status} {answer.body[:120]!r}"
            except OSError as exc:
                failed = f"{type(exc).__name__}: {exc}"
            elapsed = time.monotonic() - started
            with lock:
                if failed is None:
                    done.append(elapsed)
                else:
                    failures.append(f"{time.strftime('%H:%M:%S')} {failed}")
            time.sleep(max(0.0, interval - elapsed))

    def watch_releases(watcher: subprocess.Popen[str]) -> None:  # which release serves
        assert watcher.stdout is not None
        for line in watcher.stdout:  # until the watcher is stopped below
            try:
                release = json.loads(line)["build"]["release"]
            except (ValueError, KeyError, TypeError):
                continue  # no answer this time: a failure is the load's to count, not the watcher's
            with lock:
                if release not in releases:  # behind several hosts, both alternate
                    releases.append(release)

    watchers = [
        subprocess.Popen(
            shlex.split(command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for command in args.release_command
    ]
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.workers)]
    readers = [threading.Thread(target=watch_releases, args=(w,), daemon=True) for w in watchers]
    for thread in threads + readers:
        thread.start()
    for thread in threads:
        thread.join()
    for watcher in watchers:  # its output ends: the reader ends
        watcher.kill()
        watcher.wait()
    for reader in readers:
        reader.join(10)
    for line in failures[:20]:
        print(f"  failed: {line}")
    summary = (
        f"{len(done) + len(failures)} requests, {len(failures)} failed, "
        f"slowest {max(done, default=0):.1f} s, releases {' -> '.join(releases) or 'unknown'}"
    )
    return fail(summary) if failures or not done else ok(summary)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "check",
        choices=[
            "health",
            "embed",
            "key-ok",
            "key-refused",
            "headers",
            "burst",
            "metrics",
            "http",
            "quota",
            "load",
            "too-large",
            "down",
        ],
    )
    parser.add_argument("--https", required=True, help="https://127.0.0.1:PORT (no slash)")
    parser.add_argument("--http", help="http://127.0.0.1:PORT (no slash)")
    parser.add_argument("--ca", required=True, help="the server's certificate, trusted as a CA")
    parser.add_argument("--key", help="an API key")
    parser.add_argument("--reference", help="the reference vectors (JSON)")
    parser.add_argument("--acme-token", default="", help="NAME:CONTENT of a challenge file")
    parser.add_argument("--max-bytes", type=int, help="too-large: the service's MAX_REQUEST_BYTES")
    parser.add_argument("--count", type=int, default=80)
    parser.add_argument("--parallel", type=int, default=20)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rate", type=float, default=8.0, help="requests/s, all workers")
    parser.add_argument("--stop-file", help="load: stop once this file exists")
    parser.add_argument(
        "--release-command",
        action="append",
        default=[],
        help="load: a command printing /health answers, one a line (repeatable)",
    )
    args = parser.parse_args()
    checks = {
        "health": check_health,
        "embed": check_embed,
        "key-ok": lambda a: check_key(a, 200),
        "key-refused": lambda a: check_key(a, 401),
        "headers": check_headers,
        "burst": check_burst,
        "metrics": check_metrics,
        "http": check_http,
        "quota": check_quota,
        "load": check_load,
        "too-large": check_too_large,
        "down": check_down,
    }
    try:
        return checks[args.check](args)
    except (OSError, ValueError, KeyError) as exc:
        return fail(f"{args.check}: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
