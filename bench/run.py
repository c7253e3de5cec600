#!/usr/bin/env python3
"""`make bench`: how close the service comes to raw ONNX Runtime on this machine, in one run.

1. Raw ONNX Runtime in this process: `app.model.engine.Engine` (the service's SessionOptions, and
   its thread count, read from the same Settings the service reads) on the same model file:
   `infer()` and `session.run` alone, single texts and batches of 1-128: the ceiling. The same
   for the int8 model (`make model QUANTIZE=int8`) when it is there. Measured before and after
   the service runs; the better of the two counts (the machine may be shared).
2. The service (the venv's `api`, on throwaway embedded PostgreSQL and Redis, a `scale` key,
   SCALE_TIER_LIMIT, _RPM and _TPM -1), loaded by wrk (bench/smally.lua) with a fresh text per
   request:
   /v1/embed and /v1/embeddings with 1 and 32 inputs, at concurrency 1, 16 and 64.
3. The service with the cache warm: /v1/embed on 20 repeated texts at concurrency 16 (and at 1:
   the fixed cost of a request that never reaches the model, for the latency diagnosis), and
   /v1/embeddings with the same 256 texts in every request at concurrency 4 (all hits).
4. A victim under attack (`--only abuse`; no raw ceiling needed), on a service of its own with
   the shipped settings and keys of the shipped tiers: a `pro` key sends 4 fresh short texts
   every 100 ms, alone for 10 s, then for 20 s while a `free` key floods 10 requests/s of 100
   texts x 10,000 characters (open loop, a connection each) and, 3 s in, another `pro` key sends
   one request of 2,048 texts, then 3-13 s after. The victim's latency per window, the
   attackers' answers, the service's RSS growth.

Prints the tables, with the ratios service / raw ceiling, and PASS/MISS per target (a miss is
a finding, not a failure: the exit status is 0), and writes bench/results/<date>.json,
bench/results/latest.png and bench/results/latest.md (the tables, as in the README).

    .venv/bin/python bench/run.py [--duration 8] [--warmup 2] [--only embed-c64] [--only abuse]
                                  [--profile NAME]

--profile NAME records NAME's measured run with py-spy into .cache/bench/profile-NAME.svg
(and collapsed stacks in .txt). Smally settings in the environment (BATCH_WINDOW_MS=2,
ORT_THREADS=1, WORKERS=2, ...) reach the service and the raw runs alike and are recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import http.client
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.config import Settings  # noqa: E402
from app.model.engine import Engine  # noqa: E402
from dev.launcher import ApiError, ApiProcess, EmbeddedServers, free_port  # noqa: E402

BENCH = REPO / "bench"
RESULTS = BENCH / "results"
PROFILES = REPO / ".cache" / "bench"  # git-ignored
WORDS = BENCH / "words.txt"
LUA = BENCH / "smally.lua"
BIN = Path(sys.executable).parent
MODEL_DIR = REPO / "models" / "all-MiniLM-L6-v2"
INT8_DIR = REPO / "models" / "all-MiniLM-L6-v2-int8"
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
CONCURRENCY = (1, 16, 64)

# The targets (ratios from one run, on the 2-core build machine; the speed issue's table).
# Uncached embeddings/s at concurrency 64 / raw batched ceiling, per scenario:
THROUGHPUT_RATIOS = {"embed-c64": 0.70, "embeddings1-c64": 0.70, "embeddings32-c64": 0.95}
LATENCY_RATIO = 1.35  # uncached p50 at concurrency 1 / raw single-text p50
CACHED_RATIO = 10.0  # cached /v1/embed requests/s at concurrency 16 / raw single-text emb/s
CACHED_BATCH_RATIO = 5.0  # x256 all-hit embeddings/s at concurrency 4 / raw batched ceiling

# Settings the bench itself decides; any other Smally variable set in the environment is
# passed on (and recorded), so `BATCH_WINDOW_MS=2 make bench` measures that setting.
BENCH_OWNED = {
    "DATABASE_URL",
    "REDIS_URL",
    "API_HOST",
    "API_PORT",
    "LOG_LEVEL",
    "MODEL_PATH",
    "SCALE_TIER_LIMIT",
    "SCALE_TIER_RPM",
    "SCALE_TIER_TPM",
    "REDIS_KEY_PREFIX",
    "PROMETHEUS_MULTIPROC_DIR",
}
SMALLY_VARS = {f.name.upper() for f in dataclasses.fields(Settings)} | BENCH_OWNED


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    mode: str  # smally.lua's MODE
    inputs: int
    concurrency: int
    cached: bool = False

    @property
    def label(self) -> str:
        what = {"embed": "/v1/embed", "cached": "/v1/embed"}.get(self.mode)
        what = what or f"/v1/embeddings x{self.inputs}"
        return f"{what}{' cached' if self.cached else ''}, c={self.concurrency}"


SCENARIOS = [
    *(Scenario(f"embed-c{c}", "/v1/embed", "embed", 1, c) for c in CONCURRENCY),
    *(Scenario(f"embeddings1-c{c}", "/v1/embeddings", "embeddings", 1, c) for c in CONCURRENCY),
    *(Scenario(f"embeddings32-c{c}", "/v1/embeddings", "embeddings", 32, c) for c in CONCURRENCY),
    Scenario("cached-embed-c16", "/v1/embed", "cached", 1, 16, cached=True),
    Scenario("cached256-c4", "/v1/embeddings", "cached-embeddings", 256, 4, cached=True),
    # Diagnosis for the latency target: the fixed cost of a request that never reaches the model.
    Scenario("cached-embed-c1", "/v1/embed", "cached", 1, 1, cached=True),
]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def words() -> list[str]:
    return [w for w in WORDS.read_text().split() if w]


def sentences(n: int, seed: int) -> list[str]:
    """n texts of 6-10 random common words, like smally.lua's."""
    rng = random.Random(seed)
    vocab = words()
    return [" ".join(rng.choices(vocab, k=rng.randint(6, 10))) for _ in range(n)]


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    log("wrk is missing: apt-get install -y wrk")
    install = ["apt-get", "install", "-y", "-q", "wrk"]
    if subprocess.run(install, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], stdout=subprocess.DEVNULL, check=True)
        subprocess.run(install, stdout=subprocess.DEVNULL, check=True)
    return shutil.which("wrk") or sys.exit("wrk could not be installed")


# --------------------------------------------------------------------------- raw ceiling


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def measure_raw(model_dir: Path, settings: Settings, seconds: float) -> dict[str, Any]:
    """Engine.infer (and session.run alone) on single texts and on batches of each size."""
    import numpy as np

    embedder = Engine(model_dir, max_tokens=128, threads=settings.onnx_threads)
    pool = embedder.tokenize(sentences(4096, seed=1))  # the same texts for every model
    for _ in range(30):  # warm-up: first runs allocate and plan
        embedder.infer([pool[0]], normalize=True)

    def timed(call: Any, budget: float, minimum: int) -> list[float]:
        times: list[float] = []
        deadline = time.perf_counter() + budget
        i = 0
        while i < minimum or time.perf_counter() < deadline:
            start = time.perf_counter()
            call(i)
            times.append(time.perf_counter() - start)
            i += 1
        return times

    single = timed(lambda i: embedder.infer([pool[i % len(pool)]], normalize=True), seconds, 200)

    def feeds(row: list[int]) -> dict[str, Any]:
        ids = np.array([row], dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    prepared = [feeds(row) for row in pool[:256]]
    session_run = timed(
        lambda i: embedder.session.run(["sentence_embedding"], prepared[i % len(prepared)]),
        seconds / 2,
        200,
    )
    batches: dict[str, float] = {}
    for size in BATCH_SIZES:
        embedder.infer(pool[:size], normalize=True)
        times = timed(
            lambda i, size=size: embedder.infer(
                [pool[(i * size + j) % len(pool)] for j in range(size)], normalize=True
            ),
            seconds,
            3,
        )
        batches[str(size)] = round(size * len(times) / sum(times), 1)
    best = max(batches, key=lambda k: batches[k])
    return {
        "model_dir": str(model_dir.relative_to(REPO)),
        "onnx_sha256": embedder.manifest.onnx_sha256,
        "threads": settings.onnx_threads,
        "single_p50_ms": round(statistics.median(single) * 1e3, 3),
        "single_p99_ms": round(percentile(single, 99) * 1e3, 3),
        "single_per_s": round(len(single) / sum(single), 1),
        "session_run_p50_ms": round(statistics.median(session_run) * 1e3, 3),
        "batch_per_s": batches,
        "best_batch": int(best),
        "ceiling_per_s": batches[best],
        "mean_tokens": round(sum(len(r) for r in pool) / len(pool), 2),
    }


def raw_pass(models: dict[str, Path], settings: Settings, seconds: float) -> dict[str, Any]:
    out = {}
    for name, model_dir in models.items():
        out[name] = r = measure_raw(model_dir, settings, seconds)
        r["load_before"] = loadavg()
        log(
            f"raw {name}: single p50 {r['single_p50_ms']} ms, {r['single_per_s']}/s; "
            f"best batch {r['best_batch']}: {r['ceiling_per_s']}/s"
        )
    return out


def best_of(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """Per measurement, the better of the passes: a busy moment on a shared machine slows a
    pass down, never speeds it up, so the best is the truest ceiling (and the harder target)."""
    best = dict(passes[0])
    best["single_p50_ms"] = min(p["single_p50_ms"] for p in passes)
    best["single_p99_ms"] = min(p["single_p99_ms"] for p in passes)
    best["session_run_p50_ms"] = min(p["session_run_p50_ms"] for p in passes)
    best["single_per_s"] = max(p["single_per_s"] for p in passes)
    best["batch_per_s"] = {k: max(p["batch_per_s"][k] for p in passes) for k in best["batch_per_s"]}
    best["best_batch"] = int(max(best["batch_per_s"], key=lambda k: best["batch_per_s"][k]))
    best["ceiling_per_s"] = best["batch_per_s"][str(best["best_batch"])]
    best.pop("load_before", None)
    return best


# --------------------------------------------------------------------------- the service


class Service:
    """The venv's `api` on embedded PostgreSQL and Redis in a temporary directory (dev/launcher.py),
    and what the bench asks of it on top: keys, the backlog drained, /metrics' counters."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.servers = EmbeddedServers(workdir, persist_redis=False)
        self.api: ApiProcess | None = None
        self.key = ""
        self.env: dict[str, str] = {}
        self.port = 0

    def start(self, overrides: dict[str, str]) -> None:
        """For the throughput scenarios: one `scale` key, without a monthly or per-minute limit
        (what is measured is the service's capacity, not one customer's allowance)."""
        self.prepare(overrides)
        for limit in ("SCALE_TIER_LIMIT", "SCALE_TIER_RPM", "SCALE_TIER_TPM"):
            self.env[limit] = "-1"
        self.key = self.create_key("x@y.z", "scale")
        self.launch()

    def prepare(self, overrides: dict[str, str]) -> None:
        """The embedded servers and the api's environment; keys are created after this, before
        `launch`."""
        # DATABASE_URL and REDIS_URL are the bench's own (BENCH_OWNED): always embedded servers.
        env = {k: v for k, v in os.environ.items() if k not in SMALLY_VARS}
        env.update(overrides)
        self.env = self.servers.start(env)
        self.port = free_port()
        self.env.update(
            {
                "API_HOST": "127.0.0.1",
                "API_PORT": str(self.port),
                "LOG_LEVEL": "warning",
                "MODEL_PATH": str(MODEL_DIR),
            }
        )

    def create_key(self, email: str, tier: str) -> str:
        """A new key for the user `email` (created with `tier`), as an operator creates one."""
        created = subprocess.run(
            [str(BIN / "create_api_key"), email, tier],
            env=self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if created.returncode != 0:
            raise RuntimeError(f"create_api_key failed: {created.stderr.strip()}")
        return created.stdout.strip()

    def launch(self) -> None:
        self.api = ApiProcess(self.env, self.workdir, port=self.port).start()
        self.api.wait_healthy(60)  # ApiError, with the api's log, if it does not come up

    @property
    def url(self) -> str:
        assert self.api is not None
        return self.api.base_url

    @property
    def pid(self) -> int:
        assert self.api is not None
        return self.api.pid

    def drain(self, timeout: float = 180) -> float:
        """Wait until the work queued by the last run is done: an uncached request joins the
        back of the queue, so its answer means the backlog is gone. Returns the seconds waited."""
        started = time.monotonic()
        body = json.dumps({"text": f"drain probe {random.random()} {time.time()}"}).encode()
        request = urllib.request.Request(
            f"{self.url}/v1/embed",
            data=body,
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
        return time.monotonic() - started

    def counters(self) -> dict[str, float]:
        """Cache hits, misses (texts the model ran on) and inference runs, from /metrics."""
        wanted = {
            "smally_cache_hits_total": "cache_hits",
            "smally_cache_misses_total": "cache_misses",
            "smally_inference_latency_seconds_count": "inference_runs",
        }
        totals = dict.fromkeys(wanted.values(), 0.0)
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=30) as response:
            for line in response.read().decode().splitlines():
                name = line.split("{", 1)[0].split(" ", 1)[0]
                if name in wanted:
                    totals[wanted[name]] += float(line.rsplit(" ", 1)[1])
        return totals

    def stop(self) -> None:
        try:
            if self.api is not None:
                self.api.stop(timeout=60)  # killed past that
        except ApiError as exc:
            log(str(exc))
        finally:
            self.servers.stop()


def run_wrk(
    wrk: str, service: Service, scenario: Scenario, seconds: float, seed: int
) -> dict[str, Any]:
    threads = min(2, scenario.concurrency)
    command = [
        wrk,
        f"-t{threads}",
        f"-c{scenario.concurrency}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        f"{service.url}{scenario.path}",
        "--",
        scenario.mode,
        str(scenario.inputs),
        str(seed),
    ]
    env = {**os.environ, "SMALLY_BENCH_KEY": service.key, "SMALLY_BENCH_WORDS": str(WORDS)}
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({result.returncode}): {result.stderr or result.stdout}")
    return json.loads(lines[-1])


def measure_scenario(
    wrk: str,
    service: Service,
    scenario: Scenario,
    seconds: float,
    warmup: float,
    seed: int,
    profile: bool,
) -> dict[str, Any]:
    service.drain()
    if warmup > 0:
        run_wrk(wrk, service, scenario, warmup, seed)
        service.drain()
    recorder = None
    if profile:
        PROFILES.mkdir(parents=True, exist_ok=True)
        svg = PROFILES / f"profile-{scenario.name}.svg"
        py_spy = str(BIN / "py-spy") if (BIN / "py-spy").exists() else shutil.which("py-spy")
        if py_spy is None:
            raise RuntimeError("py-spy is missing: .venv/bin/pip install py-spy")
        common = ["--pid", str(service.pid), "--duration", str(round(seconds)), "--nonblocking"]
        recorder = subprocess.Popen(
            [py_spy, "record", "-o", str(svg), "--rate", "200", *common],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        stacks = ["-o", str(svg.with_suffix(".txt")), "--format", "raw", "--idle"]
        raw = subprocess.Popen(  # the same, with idle waits, as collapsed stacks for reading
            [py_spy, "record", *stacks, "--rate", str(PROFILE_RATE), *common],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    load_before = loadavg()
    before = service.counters()
    stats = run_wrk(wrk, service, scenario, seconds, seed + 1)
    profile = None
    if recorder is not None:
        recorder.wait()
        raw.wait()
        profile = summarize_profile(svg.with_suffix(".txt"), round(seconds))
        log(f"py-spy {scenario.name}: {svg}; wall time: {profile['wall_fraction']}")
        for frame in profile["top_own_frames"]:
            log(f"  {frame['wall_fraction']:6.1%}  {frame['frame']}")
    backlog = service.drain()
    after = service.counters()
    counts = {k: after[k] - before[k] for k in after}  # the drain probe adds one miss and run
    counts["cache_misses"] -= 1
    counts["inference_runs"] -= 1
    runs = max(counts["inference_runs"], 1)
    errors = sum(stats["errors"].values())
    seconds_run = stats["duration_us"] / 1e6
    ok = stats["requests"] - stats["errors"]["status"]
    lat = stats["latency_us"]
    return {
        "scenario": scenario.name,
        "label": scenario.label,
        "endpoint": scenario.path,
        "inputs_per_request": scenario.inputs,
        "concurrency": scenario.concurrency,
        "cached": scenario.cached,
        "seconds": round(seconds_run, 2),
        "requests": stats["requests"],
        "errors": errors,
        "error_detail": stats["errors"],
        "requests_per_s": round(ok / seconds_run, 1),
        "embeddings_per_s": round(ok * scenario.inputs / seconds_run, 1),
        "latency_ms": {k: round(v / 1e3, 3) for k, v in lat.items()},
        "load_before": load_before,
        "backlog_drained_s": round(backlog, 2),
        "cache_hits": int(counts["cache_hits"]),
        "cache_misses": int(counts["cache_misses"]),
        "inference_runs": int(counts["inference_runs"]),
        "mean_rows_per_run": round(counts["cache_misses"] / runs, 2),
        **({"profile": profile} if profile else {}),
    }


PROFILE_RATE = 100  # py-spy samples per second


def summarize_profile(path: Path, seconds: float, top: int = 12) -> dict[str, Any]:
    """Where the wall time of a py-spy collapsed-stack file (recorded with --idle) went, as
    fractions of the run: the event loop (main thread) busy or waiting in select(), ONNX
    Runtime running (a stack through Session.run), other threads busy; and the busiest frames
    (idle waits left out). A fraction near 1.0 for one thread means that thread is saturated."""
    own: dict[str, int] = {}
    where = {"event loop busy": 0, "event loop idle": 0, "onnx Session.run": 0, "other busy": 0}
    idle_leaves = ("EpollSelector.select ", "_worker (concurrent", "wait (threading")
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        idle = frames[-1].startswith(idle_leaves)
        if any(f.startswith("Session.run ") for f in frames):
            where["onnx Session.run"] += n
        elif frames[0].startswith("Thread._bootstrap"):
            where["other busy"] += 0 if idle else n
        else:
            where["event loop idle" if idle else "event loop busy"] += n
        if not idle:
            own[frames[-1]] = own.get(frames[-1], 0) + n
    wall = max(seconds * PROFILE_RATE, 1)
    return {
        "wall_fraction": {k: round(v / wall, 3) for k, v in where.items()},
        "top_own_frames": [
            {"frame": frame, "wall_fraction": round(n / wall, 3)}
            for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]
        ],
    }


# --------------------------------------------------------------------------- victim under attack

ABUSE = "abuse"  # its --only name
MODEL_NAME = "all-MiniLM-L6-v2"  # the "model" smally.lua sends
# One customer's client: a small batch of fresh texts, at a steady pace.
VICTIM_TEXTS = 4
VICTIM_EVERY_S = 0.1
# The timeline, in seconds from the victim's first request: alone, then the attack, then a
# pause for the service to settle before the window that shows whether it recovered.
ALONE_S = 10.0
ATTACK_S = 20.0
SETTLE_S = 3.0
RECOVERY_S = 10.0
# The attack: a free key floods with bodies just under the shipped 1 MiB limit, and a pro key
# sends one request as large as the API allows (2,048 inputs, also just under 1 MiB).
FLOOD_PER_S = 10
FLOOD_TEXTS = 100
FLOOD_CHARS = 10_000
BIG_BATCH_AT_S = 3.0  # into the attack
BIG_BATCH_TEXTS = 2048
BIG_BATCH_CHARS = 480
CLIENT_TIMEOUT_S = 30.0
BIG_BATCH_TIMEOUT_S = 60.0
# The users, each created as an operator would (create_api_key), on the shipped tier limits.
ABUSE_USERS = {
    "victim": ("victim@bench.invalid", "pro"),
    "flood": ("flood@bench.invalid", "free"),
    "big_batch": ("big-batch@bench.invalid", "pro"),
}
# Targets: what the victim may notice of the attack, and what the attack may cost in memory.
VICTIM_P95_MS = 500.0
VICTIM_MAX_MS = 1500.0
RSS_GROWTH_MIB = 200.0
RECOVERY_P95_RATIO = 1.5  # x the victim's p95 alone, or
RECOVERY_P95_SLACK_MS = 50.0  # that much over it, whichever is larger


@dataclasses.dataclass(frozen=True)
class Answer:
    sent: float  # time.monotonic() when the request was sent
    seconds: float
    status: str  # the HTTP status, "timeout" or "connection error"


def post_embeddings(port: int, key: str, body: bytes, timeout: float) -> Answer:
    """One POST /v1/embeddings on a connection of its own, as a client that does not pool."""
    sent = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    try:
        connection.request("POST", "/v1/embeddings", body, headers)
        response = connection.getresponse()
        response.read()
        status = str(response.status)
    except TimeoutError:
        status = "timeout"
    except (OSError, http.client.HTTPException):
        status = "connection error"
    finally:
        connection.close()
    return Answer(sent, time.monotonic() - sent, status)


def embeddings_body(texts: list[str]) -> bytes:
    return json.dumps({"model": MODEL_NAME, "input": texts}).encode()


class OpenLoop:
    """`count` requests, the i-th sent at `first_at + i * every` (time.monotonic()) whether or not
    earlier ones were answered, each on a thread of its own: a slow server builds a backlog, as it
    would with real clients, and a late answer delays no later request."""

    def __init__(
        self,
        port: int,
        key: str,
        body: Callable[[int], bytes],
        *,
        first_at: float,
        every: float,
        count: int,
        timeout: float,
    ) -> None:
        self.port, self.key, self.body, self.timeout = port, key, body, timeout
        self.first_at, self.every, self.count = first_at, every, count
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._senders: list[threading.Thread] = []
        self._schedule = threading.Thread(target=self._send_on_schedule, daemon=True)

    def start(self) -> OpenLoop:
        self._schedule.start()
        return self

    def join(self, deadline: float) -> None:
        """Wait for the schedule and every answer, until `deadline` at most (each request ends
        by its own timeout anyway; the threads are daemons)."""
        self._schedule.join(max(0.0, deadline - time.monotonic()))
        for sender in list(self._senders):
            sender.join(max(0.0, deadline - time.monotonic()))

    def _send_on_schedule(self) -> None:
        for i in range(self.count):
            time.sleep(max(0.0, self.first_at + i * self.every - time.monotonic()))
            sender = threading.Thread(target=self._send, args=(i,), daemon=True)
            self._senders.append(sender)
            sender.start()

    def _send(self, i: int) -> None:
        answer = post_embeddings(self.port, self.key, self.body(i), self.timeout)
        with self._lock:
            self.answers.append(answer)


class AbuseTexts:
    """Real words from bench/words.txt: short fresh sentences for the victim, long texts for the
    attackers. All drawn at random (a repeat is vanishingly unlikely), so the cache serves none."""

    def __init__(self, seed: int) -> None:
        self.vocab = words()
        self.rng = random.Random(seed)
        # The flood's texts are these with a request's own prefix: fresh, yet not 1 MB of random
        # words drawn per request by a bench that shares the service's cores.
        self.flood_pool = [self.text(FLOOD_CHARS) for _ in range(FLOOD_TEXTS)]

    def text(self, chars: int) -> str:
        """Random words, cut to exactly `chars` characters."""
        out = " ".join(self.rng.choices(self.vocab, k=chars // 3))
        while len(out) < chars:
            out += " " + " ".join(self.rng.choices(self.vocab, k=chars // 3))
        return out[:chars]

    def sentence(self) -> str:
        """6-10 words, like smally.lua's."""
        return " ".join(self.rng.choices(self.vocab, k=self.rng.randint(6, 10)))

    def victim_bodies(self, count: int) -> list[bytes]:
        return [
            embeddings_body([self.sentence() for _ in range(VICTIM_TEXTS)]) for _ in range(count)
        ]

    def flood_body(self, request: int) -> bytes:
        texts = []
        for j, pooled in enumerate(self.flood_pool):
            prefix = f"{request}.{j} "
            texts.append(prefix + pooled[len(prefix) :])
        return embeddings_body(texts)

    def big_batch_body(self) -> bytes:
        return embeddings_body([self.text(BIG_BATCH_CHARS) for _ in range(BIG_BATCH_TEXTS)])


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (hypercorn's worker processes when WORKERS > 1)."""
    pids = [pid]
    for parent in pids:  # grows while it is walked: breadth first
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):  # the task ended meanwhile
                pids.extend(int(child) for child in (task / "children").read_text().split())
    return pids


def rss_mib(pid: int) -> float:
    """Resident memory (VmRSS) of `pid` and its descendants, in MiB."""
    kib = 0
    for each in process_tree(pid):
        try:
            status = Path(f"/proc/{each}/status").read_text()
        except OSError:
            continue  # ended
        vm_rss = (line for line in status.splitlines() if line.startswith("VmRSS:"))
        kib += sum(int(line.split()[1]) for line in vm_rss)
    return kib / 1024


class RssSampler:
    """The service's RSS every 100 ms, with the time of each, until stopped (or `until`,
    time.monotonic(), at the latest)."""

    def __init__(self, pid: int, until: float) -> None:
        self.pid, self.until = pid, until
        self.samples: list[tuple[float, float]] = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(5)

    def last_before(self, t: float) -> float:
        return [mib for at, mib in self.samples if at < t][-1]

    def peak_since(self, t: float) -> float:
        return max(mib for at, mib in self.samples if at >= t)

    def _sample(self) -> None:
        while time.monotonic() < self.until:
            self.samples.append((time.monotonic(), rss_mib(self.pid)))
            if self._stopped.wait(0.1):
                return


def latency_summary(answers: list[Answer]) -> dict[str, Any]:
    """p50/p95/max in ms over every answer (timeouts included: the client waited that long)."""
    ms = [a.seconds * 1e3 for a in answers] or [0.0]
    return {
        "requests": len(answers),
        "non_200": sum(a.status != "200" for a in answers),
        "p50_ms": round(percentile(ms, 50), 1),
        "p95_ms": round(percentile(ms, 95), 1),
        "max_ms": round(max(ms), 1),
    }


def status_counts(answers: list[Answer]) -> dict[str, Any]:
    counts = dict.fromkeys(("200", "400", "429", "503", "other"), 0)
    other: dict[str, int] = {}
    for a in answers:
        if a.status in counts:
            counts[a.status] += 1
        else:
            counts["other"] += 1
            other[a.status] = other.get(a.status, 0) + 1
    return {**counts, "other_detail": other}


def sent_between(answers: list[Answer], start: float, end: float) -> list[Answer]:
    return [a for a in answers if start <= a.sent < end]


@dataclasses.dataclass(frozen=True)
class Timeline:
    """The scenario's moments, in time.monotonic()."""

    origin: float  # the victim's first request

    @property
    def attack_start(self) -> float:
        return self.origin + ALONE_S

    @property
    def attack_end(self) -> float:
        return self.attack_start + ATTACK_S

    @property
    def recovery_start(self) -> float:
        return self.attack_end + SETTLE_S

    @property
    def recovery_end(self) -> float:
        return self.recovery_start + RECOVERY_S


def measure_abuse(service: Service, keys: dict[str, str]) -> dict[str, Any]:
    """The victim alone, then under the flood and the big batch, then after them."""
    texts = AbuseTexts(random.SystemRandom().randrange(1, 10**6))
    big_batch_body = texts.big_batch_body()
    victim_count = round((ALONE_S + ATTACK_S + SETTLE_S + RECOVERY_S) / VICTIM_EVERY_S)
    victim_bodies = texts.victim_bodies(victim_count)
    for body in texts.victim_bodies(5):  # warm-up: the first requests look the key up, allocate
        post_embeddings(service.port, keys["victim"], body, CLIENT_TIMEOUT_S)
    when = Timeline(origin=time.monotonic() + 0.5)
    # The bench shares the cores with the service: what its own clients cost is recorded.
    bench_cpu_start = time.process_time()
    # Until every request has been answered or has timed out, at the latest.
    answers_deadline = when.recovery_end + BIG_BATCH_TIMEOUT_S
    rss = RssSampler(service.pid, until=answers_deadline).start()
    victim = OpenLoop(
        service.port,
        keys["victim"],
        victim_bodies.__getitem__,
        first_at=when.origin,
        every=VICTIM_EVERY_S,
        count=victim_count,
        timeout=CLIENT_TIMEOUT_S,
    ).start()
    flood = OpenLoop(
        service.port,
        keys["flood"],
        texts.flood_body,
        first_at=when.attack_start,
        every=1 / FLOOD_PER_S,
        count=round(ATTACK_S * FLOOD_PER_S),
        timeout=CLIENT_TIMEOUT_S,
    ).start()
    big_batch = OpenLoop(
        service.port,
        keys["big_batch"],
        lambda _: big_batch_body,
        first_at=when.attack_start + BIG_BATCH_AT_S,
        every=0,
        count=1,
        timeout=BIG_BATCH_TIMEOUT_S,
    ).start()
    log(
        f"abuse: the victim alone for {ALONE_S:.0f} s, under attack for {ATTACK_S:.0f} s, "
        f"then {SETTLE_S:.0f} + {RECOVERY_S:.0f} s after"
    )
    for loop in (victim, flood, big_batch):
        loop.join(answers_deadline)
    rss.stop()
    result = abuse_result(when, victim.answers, flood.answers, big_batch.answers, rss)
    result["bench_cpu_s"] = round(time.process_time() - bench_cpu_start, 1)
    result["bench_wall_s"] = round(time.monotonic() - when.origin, 1)
    return result


def abuse_result(
    when: Timeline,
    victim: list[Answer],
    flood: list[Answer],
    big_batch: list[Answer],
    rss: RssSampler,
) -> dict[str, Any]:
    before = rss.last_before(when.attack_start)
    peak = rss.peak_since(when.attack_start)  # the attack's requests answered, at the latest
    big = big_batch[0] if big_batch else Answer(0.0, BIG_BATCH_TIMEOUT_S, "unanswered")
    return {
        "victim": {
            "tier": ABUSE_USERS["victim"][1],
            "texts_per_request": VICTIM_TEXTS,
            "every_ms": VICTIM_EVERY_S * 1e3,
            "alone": latency_summary(sent_between(victim, when.origin, when.attack_start)),
            "attack": latency_summary(sent_between(victim, when.attack_start, when.attack_end)),
            "recovery": latency_summary(
                sent_between(victim, when.recovery_start, when.recovery_end)
            ),
        },
        "flood": {
            "tier": ABUSE_USERS["flood"][1],
            "texts_per_request": FLOOD_TEXTS,
            "chars_per_text": FLOOD_CHARS,
            "per_s": FLOOD_PER_S,
            "seconds": ATTACK_S,
            "answers": status_counts(flood),
            "latency": latency_summary(flood),
        },
        "big_batch": {
            "tier": ABUSE_USERS["big_batch"][1],
            "texts": BIG_BATCH_TEXTS,
            "chars_per_text": BIG_BATCH_CHARS,
            "at_s": BIG_BATCH_AT_S,
            "status": big.status,
            "seconds": round(big.seconds, 2),
        },
        "rss_mib": {
            "before": round(before, 1),
            "peak": round(peak, 1),
            "growth": round(peak - before, 1),
        },
        "settle_s": SETTLE_S,
        "recovery_s": RECOVERY_S,
    }


def abuse_pass(overrides: dict[str, str], workdir: Path) -> dict[str, Any]:
    """The scenario on a service of its own: shipped settings (the operator's overrides aside),
    a fresh process whose RSS is the attack's alone, and nothing queued from other scenarios."""
    workdir.mkdir()
    service = Service(workdir)
    try:
        service.prepare(overrides)
        keys = {role: service.create_key(*user) for role, user in ABUSE_USERS.items()}
        service.launch()
        log(f"abuse: service up on {service.url} (pid {service.pid})")
        return measure_abuse(service, keys)
    finally:
        service.stop()


# --------------------------------------------------------------------------- report


def raw_at(raw: dict[str, Any], rows: float) -> float:
    """Raw embeddings/s at a batch of `rows`, interpolated between the measured sizes (in log2)
    and held flat past the largest."""
    import math

    sizes = sorted(int(k) for k in raw["batch_per_s"])
    rate = {size: raw["batch_per_s"][str(size)] for size in sizes}
    rows = min(max(rows, sizes[0]), sizes[-1])
    upper = next(size for size in sizes if size >= rows)
    lower = max(size for size in sizes if size <= rows)
    if upper == lower:
        return rate[lower]
    t = (math.log2(rows) - math.log2(lower)) / (math.log2(upper) - math.log2(lower))
    return rate[lower] + t * (rate[upper] - rate[lower])


def targets(raw: dict[str, Any], runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    ceiling = raw["fp32"]["ceiling_per_s"]
    out = []
    for name, wanted in THROUGHPUT_RATIOS.items():
        if name in runs:
            run = runs[name]
            ratio = run["embeddings_per_s"] / ceiling
            # Diagnosis: how far the batches it formed fall short, and how far the rest.
            at_batch = raw_at(raw["fp32"], run["mean_rows_per_run"])
            out.append(
                {
                    "target": f"uncached {run['label']}: embeddings/s >= "
                    f"{wanted} x raw batched ceiling",
                    "value": run["embeddings_per_s"],
                    "ratio": round(ratio, 3),
                    "pass": ratio >= wanted,
                    "note": f"{run['mean_rows_per_run']:.0f} rows per forward pass on average; "
                    f"raw ORT at that batch size: {at_batch:.0f}/s, of which the service "
                    f"reached {run['embeddings_per_s'] / at_batch:.2f}",
                }
            )
    if "embed-c1" in runs:
        p50, single = runs["embed-c1"]["latency_ms"]["p50"], raw["fp32"]["single_p50_ms"]
        ratio = p50 / single
        note = f"{p50 - single:.2f} ms over the raw forward pass"
        if "cached-embed-c1" in runs:
            cached = runs["cached-embed-c1"]["latency_ms"]["p50"]
            note += (
                f"; a cached request takes {cached:.2f} ms (HTTP, auth, quota, L1), which leaves "
                f"{p50 - single - cached:.2f} ms for the L2 lookup and store, tokenizing, the "
                "queue and the thread hops"
            )
        out.append(
            {
                "target": f"uncached /v1/embed, c=1: p50 <= {LATENCY_RATIO} x raw single-text p50",
                "value": p50,
                "ratio": round(ratio, 3),
                "pass": ratio <= LATENCY_RATIO,
                "note": note,
            }
        )
    if "cached-embed-c16" in runs:
        rps = runs["cached-embed-c16"]["requests_per_s"]
        ratio = rps / raw["fp32"]["single_per_s"]
        out.append(
            {
                "target": f"cached /v1/embed, c=16: requests/s >= {CACHED_RATIO} x raw "
                "single-text embeddings/s",
                "value": rps,
                "ratio": round(ratio, 3),
                "pass": ratio >= CACHED_RATIO,
            }
        )
    if "cached256-c4" in runs:
        run = runs["cached256-c4"]
        ratio = run["embeddings_per_s"] / ceiling
        out.append(
            {
                "target": f"{run['label']}: embeddings/s >= {CACHED_BATCH_RATIO} x raw batched "
                "ceiling",
                "value": run["embeddings_per_s"],
                "ratio": round(ratio, 3),
                "pass": ratio >= CACHED_BATCH_RATIO,
            }
        )
    return out


def abuse_targets(abuse: dict[str, Any]) -> list[dict[str, Any]]:
    victim, rss = abuse["victim"], abuse["rss_mib"]
    alone_p95 = victim["alone"]["p95_ms"]
    recovered_p95 = max(RECOVERY_P95_RATIO * alone_p95, alone_p95 + RECOVERY_P95_SLACK_MS)
    checks = [
        ("victim p95 during the attack", victim["attack"]["p95_ms"], VICTIM_P95_MS, "ms"),
        ("victim max during the attack", victim["attack"]["max_ms"], VICTIM_MAX_MS, "ms"),
        ("service RSS growth under the attack", rss["growth"], RSS_GROWTH_MIB, "MiB"),
        (
            f"victim p95 from {SETTLE_S:.0f} s after the attack (alone: {alone_p95} ms; "
            f"{RECOVERY_P95_RATIO} x that or +{RECOVERY_P95_SLACK_MS:.0f} ms)",
            victim["recovery"]["p95_ms"],
            round(recovered_p95, 1),
            "ms",
        ),
    ]
    return [
        {
            "target": f"{what} <= {limit:g} {unit}",
            "value": value,
            "ratio": round(value / limit, 3),
            "pass": value <= limit,
            "shown": f"{value} {unit}",
        }
        for what, value, limit, unit in checks
    ]


def abuse_table(abuse: dict[str, Any]) -> list[str]:
    victim, flood, big, rss = abuse["victim"], abuse["flood"], abuse["big_batch"], abuse["rss_mib"]
    lines = [
        f"Victim under attack: a {victim['tier']} key sends {victim['texts_per_request']} fresh "
        f"short texts every {victim['every_ms']:.0f} ms; a {flood['tier']} key floods "
        f"{flood['per_s']} requests/s of {flood['texts_per_request']} x "
        f"{flood['chars_per_text']:,} characters for {flood['seconds']:.0f} s, and "
        f"{big['at_s']:.0f} s in, a {big['tier']} key sends one request of {big['texts']:,} x "
        f"{big['chars_per_text']} characters.",
        "",
        "| victim's requests sent | requests | non-200 | p50 ms | p95 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    windows = {
        "alone": "alone",
        "attack": "during the attack",
        "recovery": f"{abuse['settle_s']:.0f}-{abuse['settle_s'] + abuse['recovery_s']:.0f} s "
        "after the attack",
    }
    for key, label in windows.items():
        w = victim[key]
        lines.append(
            f"| {label} | {w['requests']} | {w['non_200']} | {w['p50_ms']:.1f} "
            f"| {w['p95_ms']:.1f} | {w['max_ms']:.1f} |"
        )
    answers = flood["answers"]
    other = ", ".join(f"{k}: {v}" for k, v in answers["other_detail"].items())
    lines += [
        "",
        f"Flood answers: {flood['latency']['requests']} sent; "
        + ", ".join(f"{k}: {answers[k]}" for k in ("200", "400", "429", "503", "other"))
        + (f" ({other})" if other else "")
        + f"; p50 {flood['latency']['p50_ms'] / 1e3:.1f} s, max "
        f"{flood['latency']['max_ms'] / 1e3:.1f} s. Big batch: {big['status']} after "
        f"{big['seconds']:.1f} s. Service RSS: {rss['before']:.0f} MiB before, "
        f"{rss['peak']:.0f} MiB at the peak (+{rss['growth']:.0f} MiB). The bench's own "
        f"clients: {abuse['bench_cpu_s']:.1f} CPU-seconds in {abuse['bench_wall_s']:.0f} s.",
    ]
    return lines


def table(report: dict[str, Any]) -> str:
    lines = throughput_table(report) if report.get("service") else []
    if "abuse" in report:
        lines += ["", *abuse_table(report["abuse"])] if lines else abuse_table(report["abuse"])
    lines.append("")
    for t in report["targets"]:
        note = f" ({t['note']})" if t.get("note") else ""
        shown = t.get("shown") or f"ratio {t['ratio']}"
        lines.append(f"- **{'PASS' if t['pass'] else 'MISS'}** {t['target']}: {shown}{note}")
    return "\n".join(lines)


def throughput_table(report: dict[str, Any]) -> list[str]:
    raw, runs = report["raw"], report["service"]
    fp32 = raw["fp32"]
    ceiling, single = fp32["ceiling_per_s"], fp32["single_p50_ms"]
    lines = [
        "| scenario | requests/s | embeddings/s | p50 ms | p95 ms | p99 ms "
        "| emb/s ÷ raw fp32 ceiling | p50 ÷ raw 1-text p50 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in raw.items():
        lines.append(
            f"| raw ORT {name}, 1 text (`infer`; `session.run` alone: p50 "
            f"{r['session_run_p50_ms']:.2f} ms) | {r['single_per_s']:.0f} "
            f"| {r['single_per_s']:.0f} | {r['single_p50_ms']:.2f} | | {r['single_p99_ms']:.2f} "
            f"| {r['single_per_s'] / ceiling:.2f} | {r['single_p50_ms'] / single:.2f} |"
        )
        batches = ", ".join(f"{k}: {v:.0f}" for k, v in r["batch_per_s"].items())
        lines.append(
            f"| raw ORT {name}, best batch = {r['best_batch']} (emb/s by batch size: {batches}) "
            f"| | {r['ceiling_per_s']:.0f} | | | | {r['ceiling_per_s'] / ceiling:.2f} | |"
        )
    for run in runs:
        lat = run["latency_ms"]
        err = f" ({run['errors']} errors)" if run["errors"] else ""
        vs_latency = ""
        if run["concurrency"] == 1 and run["inputs_per_request"] == 1:
            vs_latency = f"{lat['p50'] / single:.2f}"
        lines.append(
            f"| {run['label']}{err} | {run['requests_per_s']:.0f} | {run['embeddings_per_s']:.0f}"
            f" | {lat['p50']:.2f} | {lat['p95']:.2f} | {lat['p99']:.2f}"
            f" | {run['embeddings_per_s'] / ceiling:.2f} | {vs_latency} |"
        )
    return lines


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["service"]
    labels = [r["label"].replace(", c=", "\nc=") for r in runs]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 9), sharex=True)
    x = range(len(runs))
    bars = top.bar(x, [r["embeddings_per_s"] for r in runs], color="#4c72b0")
    top.bar_label(bars, fmt="%.0f", fontsize=7)
    for r, colour, style in (("fp32", "#c44e52", "--"), ("int8", "#55a868", ":")):
        if r in report["raw"]:
            ceiling = report["raw"][r]["ceiling_per_s"]
            top.axhline(ceiling, color=colour, linestyle=style, label=f"raw ORT {r} ceiling")
    top.axhline(
        report["raw"]["fp32"]["ceiling_per_s"] * THROUGHPUT_RATIOS["embed-c64"],
        color="#c44e52",
        linestyle="-",
        linewidth=0.6,
        label=f"{THROUGHPUT_RATIOS['embed-c64']} x fp32 ceiling",
    )
    top.set_ylabel("embeddings/s")
    top.set_yscale("log")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(
        f"Smally bench {report['date']} ({report['machine']['cpus']} cores, "
        f"load {report['machine']['load_before'][0]})"
    )
    width = 0.27
    for offset, key, colour in (
        (-width, "p50", "#4c72b0"),
        (0, "p95", "#dd8452"),
        (width, "p99", "#c44e52"),
    ):
        bottom.bar(
            [i + offset for i in x],
            [r["latency_ms"][key] for r in runs],
            width,
            label=key,
            color=colour,
        )
    bottom.axhline(
        report["raw"]["fp32"]["single_p50_ms"],
        color="black",
        linestyle="--",
        linewidth=0.8,
        label="raw single-text p50",
    )
    bottom.set_yscale("log")
    bottom.set_ylabel("latency, ms")
    bottom.legend(loc="upper left", fontsize=8)
    bottom.set_xticks(list(x))
    bottom.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def git_commit() -> str:
    result = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    return result.stdout.strip() or "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def throughput_pass(
    args: argparse.Namespace,
    overrides: dict[str, str],
    scenarios: list[Scenario],
    workdir: Path,
) -> dict[str, Any]:
    """The raw ceiling, then the service under wrk, then the raw ceiling again."""
    wrk = ensure_wrk()
    out: dict[str, Any] = {
        "wrk": subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout.split("\n")[0],
        "duration_s": args.duration,
        "warmup_s": args.warmup,
    }
    service = Service(workdir)
    try:
        service.start(overrides)
        settings = Settings.from_env(service.env, dotenv=None)
        out["service_threads"] = settings.onnx_threads
        log(f"service up on {service.url} (pid {service.pid}); raw ORT runs first")
        models = {"fp32": MODEL_DIR}
        if (INT8_DIR / "manifest.json").exists():
            models["int8"] = INT8_DIR
        else:
            log(f"no {INT8_DIR.name} (make model QUANTIZE=int8): int8 skipped")
        passes = [raw_pass(models, settings, args.raw_seconds)]
        seed = random.SystemRandom().randrange(1, 10**6)
        results = []
        for i, scenario in enumerate(scenarios):
            result = measure_scenario(
                wrk,
                service,
                scenario,
                args.duration,
                args.warmup,
                seed + 10 * i,
                scenario.name in args.profile,
            )
            results.append(result)
            log(
                f"{scenario.label}: {result['requests_per_s']} req/s, "
                f"{result['embeddings_per_s']} emb/s, p50 {result['latency_ms']['p50']} ms, "
                f"p99 {result['latency_ms']['p99']} ms, errors {result['errors']}, "
                f"cache hits {result['cache_hits']}, {result['mean_rows_per_run']} rows/run"
            )
        out["service"] = results
        log("raw ORT again, after the service runs (the ceiling is the better of the two)")
        passes.append(raw_pass(models, settings, args.raw_seconds))
    finally:
        service.stop()
    out["raw_passes"] = passes
    out["raw"] = {name: best_of([p[name] for p in passes]) for name in passes[0]}
    return out


def abuse_log(abuse: dict[str, Any]) -> None:
    victim = abuse["victim"]
    for window in ("alone", "attack", "recovery"):
        w = victim[window]
        log(
            f"abuse: victim {window}: p50 {w['p50_ms']} ms, p95 {w['p95_ms']} ms, "
            f"max {w['max_ms']} ms, {w['non_200']} of {w['requests']} not 200"
        )
    log(
        f"abuse: flood answers {abuse['flood']['answers']}; big batch "
        f"{abuse['big_batch']['status']} in {abuse['big_batch']['seconds']} s; RSS "
        f"{abuse['rss_mib']}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per scenario")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per scenario")
    ap.add_argument("--raw-seconds", type=float, default=1.0, help="seconds per raw measurement")
    ap.add_argument("--only", action="append", help="run only these scenarios (repeatable)")
    ap.add_argument("--profile", action="append", default=[], help="py-spy these scenarios")
    ap.add_argument("--no-write", action="store_true", help="print only; write no results")
    args = ap.parse_args(argv)
    unknown = set(args.only or ()) - {s.name for s in SCENARIOS} - {ABUSE}
    if unknown:
        ap.error(f"unknown scenario {', '.join(sorted(unknown))}")

    started = time.monotonic()
    overrides = {k: v for k, v in os.environ.items() if k in SMALLY_VARS - BENCH_OWNED}
    scenarios = [s for s in SCENARIOS if not args.only or s.name in args.only]
    report: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "time": dt.datetime.now().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": cpu_model(),
            "load_before": loadavg(),
        },
        "settings_overrides": overrides,
    }
    import onnxruntime

    report["onnxruntime"] = onnxruntime.__version__
    log(f"load average {report['machine']['load_before']} before the bench")

    report["targets"] = []
    with tempfile.TemporaryDirectory(prefix="smally-bench-") as tmp:
        # The raw ceiling is measured only for the scenarios that are compared with it.
        if scenarios:
            report.update(throughput_pass(args, overrides, scenarios, Path(tmp)))
            runs = {r["scenario"]: r for r in report["service"]}
            report["targets"] += targets(report["raw"], runs)
        if not args.only or ABUSE in args.only:
            report["abuse"] = abuse_pass(overrides, Path(tmp) / ABUSE)
            abuse_log(report["abuse"])
            report["targets"] += abuse_targets(report["abuse"])

    report["machine"]["load_after"] = loadavg()
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    text = table(report)
    print(text)
    print(
        f"\nload average {report['machine']['load_before']} before, "
        f"{report['machine']['load_after']} after; {report['elapsed_s']} s"
    )
    if not args.no_write:
        write_results(report, text)
    return 0


def write_results(report: dict[str, Any], text: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{report['date']}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "latest.md").write_text(text + "\n")
    written = "latest.md"
    if report.get("service"):  # the chart is the throughput scenarios'
        try:
            chart(report, RESULTS / "latest.png")
            written += ", latest.png"
        except ImportError:
            log("matplotlib is missing (pip install -e '.[bench]'): no chart")
    log(f"wrote {out.relative_to(REPO)}, {written}")


if __name__ == "__main__":
    sys.exit(main())
