"""``bench/bench_fuse.py``'s ORT-optimizer anchor with its symbolic shape inference off (ORT's own switch, used
where that inference does not finish: transformers 5.17's DeBERTa-v3 export, whose If nodes make it copy the
model's weights into every branch). On the tiny DeBERTa-v3 of transformers 5.17 (two If nodes): the switch holds
through the fp16 conversion (no symbolic shape inference runs at all, where the default runs it), and the FP16
graph it gives answers as the FP32 export does."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("onnxruntime.transformers.optimizer")

REPO = Path(__file__).resolve().parents[1]
TINY_DEBERTA = REPO / "tests" / "fixtures" / "transformers_5_17" / "deberta-v3-tiny.onnx"


def load_bench_fuse():
    spec = importlib.util.spec_from_file_location("bench_fuse", REPO / "bench" / "bench_fuse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def symbolic_runs(monkeypatch) -> list[int]:
    """How many times ORT's symbolic shape inference prepares a graph (once a graph and once each If branch)."""
    import onnxruntime.transformers.optimizer  # noqa: F401  (puts ORT's tools folder on sys.path)
    import symbolic_shape_infer

    calls = []
    original = symbolic_shape_infer.SymbolicShapeInference._preprocess

    def counted(self, model):
        calls.append(len(model.graph.node))
        return original(self, model)

    monkeypatch.setattr(symbolic_shape_infer.SymbolicShapeInference, "_preprocess", counted)
    return calls


def test_without_shape_inference_no_symbolic_inference_runs_and_the_answer_holds(tmp_path, symbolic_runs):
    bench = load_bench_fuse()
    assert sum(n.op_type == "If" for n in onnx.load(str(TINY_DEBERTA)).graph.node) == 2

    bench.ort_optimize(TINY_DEBERTA, tmp_path / "default.onnx", "deberta-v3", fp16=True, use_gpu=False)
    default_runs = len(symbolic_runs)
    assert default_runs > 2  # the default runs it, into both branches of the If nodes

    out = tmp_path / "noshape.onnx"
    bench.ort_optimize(TINY_DEBERTA, out, "deberta-v3", fp16=True, use_gpu=False, shape_inference=False)
    assert len(symbolic_runs) == default_runs  # none at all, also after the fp16 conversion

    model = onnx.load(str(out))
    weights = [t for t in model.graph.initializer if t.dims and np.prod(t.dims) >= 64 * 64]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types

    from tqc.models.recipes import find_recipe

    recipe = find_recipe("deberta-v3")
    vocab = recipe.config("tiny").vocab_size
    reference = bench.answer(bench.OrtRunner(TINY_DEBERTA, "cpu", 1).session, recipe.inputs, vocab)
    for path in (out, tmp_path / "default.onnx"):
        match = bench.compare_answer(bench.answer(bench.OrtRunner(path, "cpu", 1).session, recipe.inputs, vocab),
                                     reference)
        assert match["finite"] and match["cos_min"] > 0.999, (path.name, match)
