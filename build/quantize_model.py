#!/usr/bin/env python3
"""Build the int8 variant of the all-MiniLM-L6-v2 ONNX model (`make model QUANTIZE=int8`).

Usage:
    python build/quantize_model.py --src models/all-MiniLM-L6-v2 \
        --out models/all-MiniLM-L6-v2-int8 [--reference PATH] [--force]

(or ``build/make_model.py --out models/all-MiniLM-L6-v2 --quantize int8``, which builds the
float model first if needed). The output is a model directory like the float one, served by the
same engine through ``MODEL_PATH``: model.onnx, tokenizer.json and a manifest with its own
``onnx_sha256``, ``"quantization": "int8"`` and the float model's hash as ``source_onnx_sha256``.
The model keeps the name all-MiniLM-L6-v2 (clients ask for it by that name); the embedding cache
keys on the onnx hash, so float and int8 vectors are never mixed.

Recipe: onnxruntime.quantization.quantize_dynamic (int8 weights per output channel, uint8
activations quantized per tensor at run time), on a graph prepared so that this is accurate:

1. Only the weight MatMuls are quantized: the Q/K/V and attention-output projections and the
   FFN input projection (30 of 36). The FFN output projections stay float: their input is the
   GELU output, whose outlier channels (up to ~25 against a median of ~1) leave too few levels
   for everything else. Embeddings, LayerNorm, softmax, the attention score MatMuls and the
   pooling stay float too.
2. SmoothQuant-style rescaling (Xiao et al. 2022) of every quantized MatMul's input: X W =
   (X / s) (s W) per input channel, s = max|X|^a / max|W|^(1-a), a = 0.6, with max|X| taken over
   CALIBRATION_TEXTS (not the reference texts). Exact in float; it moves activation outliers
   into the per-channel-quantized weights.
3. Padding rows are zeroed before each quantized MatMul (exact in float: padded positions are
   masked out of attention and pooling), so they cannot widen a batch's activation range.

Measured against the 40 public reference vectors (cosine, min over the cases; the per-tensor
activation scale spans a whole batch, so batched runs are measured too):

    recipe                                        one text   40 in a batch   random batches
    naive quantize_dynamic (every MatMul+Gather)   0.865         -                -
    weight MatMuls only, per channel               0.974         -                -
    + smoothing (a=0.7), all 36 weight MatMuls     0.993       0.982            0.965
    + padding masked, FFN outputs float            0.997       0.998            0.996
      (the same, measured on an AVX2-only CPU)      0.988       0.991              -
    + 7-bit weights (reduce_range; shipped), AVX2   0.996       0.993              -

(random batches: 16 batches of 16 or 64 random common-word texts, against the float model.)
MatMulNBits (8-bit blocks, accuracy_level 4) reaches 0.998 and is batch-independent, but with
ORT 1.32 on this CPU it was no faster than float for batches, so it was not adopted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

# make_model.py sits beside this file; when it is the running script it is __main__, and
# make_model.main registers itself under its own name first so it is not loaded twice.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_model
from make_model import BuildError, log, sha256_file

if TYPE_CHECKING:  # heavy imports stay lazy so the "up to date" path is instant
    import numpy as np
    import onnx

QUANTIZATION = "int8"
# Bump when the recipe changes so existing builds are not mistaken for up to date.
QUANTIZER_VERSION = 1
SMOOTH_ALPHA = 0.6
# Weight MatMuls left in float, by the node name suffix make_model.build_bert_graph gives them.
KEEP_FLOAT = ("/ffn_out/mm",)
MIN_COSINE = 0.99
ROW_MASK = "int8/row_mask"

# Calibration input for the smoothing scales: varied lengths, scripts and registers, none of
# them a reference text (the reference is the test, not the training set).
CALIBRATION_TEXTS = [
    "Where can I find the nearest train station?",
    "The invoice was sent to the wrong address.",
    "Deep learning requires large amounts of labelled data.",
    "hi",
    "yes",
    "42",
    "Thanks!",
    "Our quarterly revenue grew by 12 percent.",
    "Please update the shipping details for order 7781.",
    "She plays the violin in the city orchestra.",
    "How do transformers handle long documents?",
    "Le chat dort sur le canapé.",
    "Der Hund bellt laut.",
    "¿Dónde está la biblioteca?",
    "北京是中国的首都",
    "こんにちは世界",
    "Как пройти в библиотеку?",
    "🎉 party time 🎈",
    "def add(a, b): return a + b",
    "https://example.org/docs?page=2",
    "ERROR 500 internal server error",
    "The patient reported mild headaches and fatigue.",
    "Book a table for two at 7pm",
    "Photosynthesis converts light energy into chemical energy.",
    "I can't log into my account",
    "What's the difference between a list and a tuple?",
    "Sunsets over the ocean are beautiful.",
    "The court ruled in favour of the defendant.",
    "Install the package with pip.",
    "x",
    "Bananas are rich in potassium.",
    "The train was delayed by forty minutes because of snow.",
]


def _manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / "manifest.json").read_text(encoding="utf-8"))


def up_to_date(out: Path, src: Path) -> bool:
    """Cheap check (no onnx import): same recipe, built from the current float model, and
    model.onnx still has the hash its manifest records."""
    try:
        manifest = _manifest(out)
        return (
            manifest.get("quantization") == QUANTIZATION
            and manifest.get("quantizer_version") == QUANTIZER_VERSION
            and manifest.get("source_onnx_sha256") == _manifest(src).get("onnx_sha256")
            and (out / "tokenizer.json").is_file()
            and sha256_file(out / "model.onnx") == manifest.get("onnx_sha256")
        )
    except (OSError, ValueError):
        return False


def weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMul nodes whose second input is a weight (an initializer)."""
    weights = {init.name for init in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def to_quantize(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    nodes = [n for n in weight_matmuls(model) if not n.name.endswith(KEEP_FLOAT)]
    kept = len(weight_matmuls(model)) - len(nodes)
    if not nodes or not kept:  # the graph is not the one make_model.py builds
        raise BuildError(f"unexpected graph: {len(nodes)} MatMuls to quantize, {kept} kept")
    return nodes


def calibrate(model: onnx.ModelProto, tokenizer: Path, texts: list[str]) -> dict[str, np.ndarray]:
    """Per-channel max |x| of each quantized MatMul's input over `texts`, one text per run."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    probe = type(model)()
    probe.CopyFrom(model)
    names = sorted({n.input[0] for n in to_quantize(model)})
    for name in names:
        probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    seqs, _ = make_model._encode(tokenizer, texts)
    amax: dict[str, np.ndarray] = {}
    for seq in seqs:
        ids = np.array([seq], dtype=np.int64)
        outs = session.run(names, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        for name, out in zip(names, outs, strict=True):
            m = np.abs(out).reshape(-1, out.shape[-1]).max(0)
            amax[name] = np.maximum(amax[name], m) if name in amax else m
    return amax


def prepare(model: onnx.ModelProto, amax: dict[str, np.ndarray], alpha: float) -> onnx.ModelProto:
    """The float graph with padding rows zeroed and smoothing scales before each quantized
    MatMul group (MatMuls sharing an input share one scale); same outputs as `model`."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    out = type(model)()
    out.CopyFrom(model)
    inits = {init.name: init for init in out.graph.initializer}
    quantized = {n.name for n in to_quantize(out)}
    groups: dict[str, list[onnx.NodeProto]] = {}
    for n in out.graph.node:
        if n.name in quantized:
            groups.setdefault(n.input[0], []).append(n)

    out.graph.initializer.append(numpy_helper.from_array(np.array([2], np.int64), "int8/axes2"))
    nodes = [
        helper.make_node(
            "Cast", ["attention_mask"], ["int8/mask_f"], name="int8/mask_f", to=TensorProto.FLOAT
        ),
        helper.make_node("Unsqueeze", ["int8/mask_f", "int8/axes2"], [ROW_MASK], name=ROW_MASK),
    ]
    for n in out.graph.node:
        nodes.append(n)
        x = n.output[0]
        if x not in groups:
            continue
        members = groups[x]
        wmax = np.max(
            [np.abs(numpy_helper.to_array(inits[g.input[1]])).max(axis=1) for g in members], axis=0
        )
        scale = np.maximum(amax[x], 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)
        scale = scale.astype(np.float32)
        inv = f"{x}/int8_smooth"
        out.graph.initializer.append(numpy_helper.from_array((1 / scale).astype(np.float32), inv))
        nodes.append(helper.make_node("Mul", [x, ROW_MASK], [f"{x}/int8_rows"], name=f"{x}/rows"))
        nodes.append(helper.make_node("Mul", [f"{x}/int8_rows", inv], [f"{x}/int8_in"], name=inv))
        for g in members:
            w = numpy_helper.to_array(inits[g.input[1]]) * scale[:, None]
            inits[g.input[1]].CopyFrom(numpy_helper.from_array(w.astype(np.float32), g.input[1]))
            g.input[0] = f"{x}/int8_in"
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def verify(model_dir: Path, reference: Path | None, source: Path) -> float:
    """Cosine of every reference case, alone and in one padded batch, against the reference
    (or, without one, against the float model on a few texts); returns the minimum."""
    import numpy as np

    if reference is not None:
        cases = json.loads(reference.read_text(encoding="utf-8"))["cases"]
        texts = [c["text"] for c in cases]
        expect = make_model._unit(np.array([c["embedding"] for c in cases]))
    else:
        texts = ["hello world", "a", "The quick brown fox jumps over the lazy dog.", "naïve 東京"]
        seqs, pad_id = make_model._encode(source / "tokenizer.json", texts)
        float_session = make_model._session(source / "model.onnx")
        expect = make_model._unit(make_model._run(float_session, seqs, pad_id))
    sess = make_model._session(model_dir / "model.onnx")
    seqs, pad_id = make_model._encode(model_dir / "tokenizer.json", texts)
    single = np.concatenate([make_model._run(sess, [s], pad_id) for s in seqs])
    batched = make_model._run(sess, seqs, pad_id)
    cos_single = (make_model._unit(single) * expect).sum(1)
    cos_batched = (make_model._unit(batched) * expect).sum(1)
    cos = np.minimum(cos_single, cos_batched)
    worst = int(cos.argmin())
    log(
        f"int8 vs {'reference' if reference else 'float model'}: {len(texts)} texts, min cosine "
        f"{cos_single.min():.5f} alone, {cos_batched.min():.5f} batched ({texts[worst]!r})"
    )
    if cos[worst] < MIN_COSINE:
        raise BuildError(f"int8 cosine {cos[worst]:.5f} < {MIN_COSINE} for {texts[worst]!r}")
    return float(cos[worst])


def quantize(src: Path, out: Path, reference: Path | None) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = _manifest(src)
    if source.get("quantization"):
        raise BuildError(f"{src} is already quantized ({source['quantization']})")
    model = onnx.load(str(src / "model.onnx"))
    amax = calibrate(model, src / "tokenizer.json", CALIBRATION_TEXTS)
    nodes = [n.name for n in to_quantize(model)]
    log(f"calibrated {len(amax)} MatMul inputs on {len(CALIBRATION_TEXTS)} texts")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the service may run as another user
    try:
        prepared = tmp / "prepared.onnx"
        onnx.save_model(prepare(model, amax, SMOOTH_ALPHA), str(prepared))
        logging.disable(logging.WARNING)  # its advice to run onnx's pre-processing: not needed
        try:
            quantize_dynamic(
                str(prepared),
                str(tmp / "model.onnx"),
                op_types_to_quantize=["MatMul"],
                nodes_to_quantize=nodes,
                per_channel=True,
                # 7-bit weights: on x86 CPUs without VNNI (AVX2 only), ORT's u8s8 kernel adds
                # products pairwise in int16 (vpmaddubsw), which saturates with 8-bit weights:
                # min cosine 0.988 on an AVX2-only EPYC against 0.996 with this. The model is
                # built on one machine and served on others, so it must hold on all of them.
                reduce_range=True,
                weight_type=QuantType.QInt8,
                extra_options={"MatMulConstBOnly": True},
            )
        finally:
            logging.disable(logging.NOTSET)
        prepared.unlink()
        shutil.copyfile(src / "tokenizer.json", tmp / "tokenizer.json")
        manifest = {
            **source,
            "onnx_sha256": sha256_file(tmp / "model.onnx"),
            "quantization": QUANTIZATION,
            "quantizer_version": QUANTIZER_VERSION,
            "quantization_recipe": (
                f"onnxruntime quantize_dynamic: {len(nodes)} weight MatMuls, int8 per-channel "
                f"weights, uint8 dynamic activations; SmoothQuant alpha {SMOOTH_ALPHA}; "
                f"padding rows zeroed; float: {', '.join(KEEP_FLOAT)}, embeddings, attention "
                "scores, LayerNorm, pooling"
            ),
            "source_onnx_sha256": source["onnx_sha256"],
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", "utf-8")
        size = (tmp / "model.onnx").stat().st_size
        log(f"wrote int8 model.onnx ({size / 1e6:.1f} MB), {len(nodes)} MatMuls quantized")
        verify(tmp, reference, src)  # before installing: never replace a good one
        make_model._install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"int8 model ready: {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--src", type=Path, required=True, help="the float model directory")
    ap.add_argument("--out", type=Path, required=True, help="output model directory")
    ap.add_argument("--reference", type=Path, help="reference JSON (default: make_model's)")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = ap.parse_args(argv)

    if not args.force and up_to_date(args.out, args.src):
        print(f"int8 model up to date: {args.out}")
        return 0
    if not (args.src / "manifest.json").is_file():
        print(f"error: no float model at {args.src} (run make_model.py first)", file=sys.stderr)
        return 2
    reference: Path | None = args.reference
    if reference is None and make_model.DEFAULT_REFERENCE.exists():
        reference = make_model.DEFAULT_REFERENCE
    if reference is not None and not reference.exists():
        print(f"error: reference file not found: {reference}", file=sys.stderr)
        return 2
    if reference is None:
        log("note: no reference file; checking against the float model instead")
    try:
        quantize(args.src, args.out, reference)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
