"""The int8 model (`make model QUANTIZE=int8`, build/quantize_model.py): built by the same
command into a temporary directory, then served by the same engine, every public reference case
must keep cosine >= 0.99, alone and batched."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from app.model.engine import Engine
from tests.embedding import embed
from tests.helpers import MODEL_PATH, REPO, cosine, load_reference

MIN_COSINE = 0.99
_COMMON = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which "
    "she do how their if will up other about out many then them these so some her would make "
    "like him into time has look two more write go see number no way could people my than "
    "first water been call who oil its now find long down day did get come made may part"
)
WORDS = _COMMON.split()


def _build(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "build" / "make_model.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(float model dir, int8 model dir), built by `make_model.py --quantize int8` beside a
    copy of the float model (the copy is up to date, so only the int8 variant is built)."""
    base = tmp_path_factory.mktemp("quantized")
    source = base / MODEL_PATH.name
    shutil.copytree(MODEL_PATH, source)
    result = _build("--out", str(source), "--quantize", "int8")
    assert result.returncode == 0, result.stderr + result.stdout
    assert "model up to date" in result.stdout
    yield source, base / f"{MODEL_PATH.name}-int8"


def test_manifest_names_the_quantization_and_its_own_hash(built: tuple[Path, Path]) -> None:
    source, out = built
    manifest = json.loads((out / "manifest.json").read_text())
    float_manifest = json.loads((source / "manifest.json").read_text())
    assert manifest["quantization"] == "int8"
    assert manifest["name"] == float_manifest["name"]  # clients ask for it by the same name
    assert manifest["source_onnx_sha256"] == float_manifest["onnx_sha256"]
    assert manifest["onnx_sha256"] != float_manifest["onnx_sha256"]
    digest = hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    assert digest == manifest["onnx_sha256"]
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()


def test_every_reference_case_keeps_its_direction(built: tuple[Path, Path]) -> None:
    _, out = built
    cases = load_reference()["cases"]
    engine = Engine(out, max_tokens=128)
    texts = [case["text"] for case in cases]
    batched = embed(engine, texts)
    assert batched.token_counts == [case["tokens"] for case in cases]
    worst = 1.0
    for i, case in enumerate(cases):
        alone = embed(engine, [case["text"]]).vectors[0]
        for vector in (alone, batched.vectors[i]):
            similarity = cosine(vector, case["embedding"])
            worst = min(worst, similarity)
            assert similarity >= MIN_COSINE, (case["text"], similarity)
    print(f"int8 min cosine over {len(cases)} cases: {worst:.5f}")


def test_random_batches_stay_close_to_the_float_model(built: tuple[Path, Path]) -> None:
    """Activations are quantized per batch, so a text's neighbours matter: mixed batches of
    short and long texts, as dynamic batching forms them, must stay close too."""
    source, out = built
    rng = random.Random(7)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(1, 24))) for _ in range(96)]
    texts += ["OK", "a", "42", "😀", "東京", "Straße"]
    reference = embed(Engine(source, max_tokens=128), texts).vectors
    quantized = Engine(out, max_tokens=128)
    order = list(range(len(texts)))
    for size in (7, 16, 64):
        rng.shuffle(order)
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            vectors = embed(quantized, [texts[i] for i in chunk]).vectors
            similarity = np.sum(vectors * reference[chunk], axis=1)
            assert similarity.min() >= MIN_COSINE, (size, texts[chunk[int(similarity.argmin())]])


def test_up_to_date_int8_model_is_not_rebuilt(built: tuple[Path, Path]) -> None:
    source, out = built
    before = (out / "model.onnx").stat().st_mtime_ns
    result = _build("--out", str(source), "--quantize", "int8")
    assert result.returncode == 0, result.stderr
    assert "int8 model up to date" in result.stdout
    assert (out / "model.onnx").stat().st_mtime_ns == before
