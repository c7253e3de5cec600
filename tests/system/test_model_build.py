"""The model build (build/make_model.py): a tiny random model through the same graph code,
checked against an independent NumPy forward pass, and the instant up-to-date path."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from app.model.engine import Engine
from tests.embedding import embed
from tests.helpers import MODEL_PATH, REPO, build_tiny_model

spec = importlib.util.spec_from_file_location("make_model", REPO / "build" / "make_model.py")
assert spec is not None and spec.loader is not None
make_model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_model)


def test_graph_matches_a_numpy_forward_pass(tmp_path: Path) -> None:
    weights, config = make_model.tiny_random_weights(vocab_size=1000, seed=7)
    graph = make_model.build_bert_graph(weights, config)
    path = tmp_path / "tiny.onnx"
    path.write_bytes(graph.SerializeToString())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.array([[101, 7, 8, 9, 102], [101, 5, 102, 0, 0]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    (onnx_out,) = session.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})
    expected = make_model.numpy_forward(weights, config, ids, mask)
    np.testing.assert_allclose(onnx_out, expected, rtol=1e-4, atol=1e-5)


def test_tiny_model_is_served_by_the_same_engine(tmp_path: Path) -> None:
    out = build_tiny_model(tmp_path / "tiny-model")
    engine = Engine(out, max_tokens=128)
    assert engine.manifest.name == "tiny-random"
    batch = embed(engine, ["hello world", "a"])
    assert batch.vectors.shape == (2, engine.manifest.dimension)
    assert batch.token_counts == [4, 3]


def test_up_to_date_model_is_not_rebuilt() -> None:
    before = (MODEL_PATH / "model.onnx").stat().st_mtime_ns
    result = subprocess.run(
        [sys.executable, str(REPO / "build" / "make_model.py"), "--out", str(MODEL_PATH)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert "up to date" in result.stdout + result.stderr
    assert (MODEL_PATH / "model.onnx").stat().st_mtime_ns == before


def test_the_real_build_works_with_no_reference_file(tmp_path: Path) -> None:
    """A checkout without the reference data (the script copied where its default path
    resolves to nothing) still builds the real model and verifies what it can: it used to
    crash zipping its fallback texts against an empty list of reference cases."""
    script = tmp_path / "repo" / "build" / "make_model.py"
    script.parent.mkdir(parents=True)
    script.write_text((REPO / "build" / "make_model.py").read_text(encoding="utf-8"))
    out = tmp_path / "model"
    cache = REPO / ".cache" / "model-src"
    run = subprocess.run(
        [sys.executable, str(script), "--out", str(out), "--cache-dir", str(cache)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "no reference file" in run.stdout + run.stderr
    assert "batched vs single" in run.stdout + run.stderr
    engine = Engine(out, max_tokens=256, threads=1)
    assert engine.manifest.onnx_sha256 == Engine(MODEL_PATH, max_tokens=256).manifest.onnx_sha256
