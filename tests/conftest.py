"""Shared fixtures: small synthetic graphs and a per-session cache of real exports."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
# calibration: the packaged sentences (the CLI's default set); judging: 256 held-out sentences, none of them a
# calibration sentence (tests/data/README.md says where they come from)
CALIB_SENTENCES = REPO / "models" / "data" / "calib_sentences.txt"
HELDOUT_SENTENCES = REPO / "tests" / "data" / "heldout_sentences.txt"


def make_mlp(path: Path | None = None, hidden: int = 8, with_identity: bool = True, seed: int = 0) -> onnx.ModelProto:
    """x[batch, 4] -> MatMul(W1) -> Add(b) -> Relu -> (Identity) -> MatMul(W2) -> y[batch, 3].

    Also carries foldable constant arithmetic (W1 = Wa + Wb) so ``fold`` has work to do.
    """
    rng = np.random.default_rng(seed)
    wa = rng.standard_normal((4, hidden)).astype(np.float32)
    wb = rng.standard_normal((4, hidden)).astype(np.float32)
    b = rng.standard_normal((hidden,)).astype(np.float32)
    w2 = rng.standard_normal((hidden, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Add", ["wa", "wb"], ["w1"], name="fold_me"),
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="mm1"),
        helper.make_node("Add", ["h0", "b"], ["h1"], name="bias"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
    ]
    if with_identity:
        nodes.append(helper.make_node("Identity", ["h2"], ["h3"], name="ident"))
    else:
        nodes.append(helper.make_node("Relu", ["h2"], ["h3"], name="relu2"))
    nodes.append(helper.make_node("MatMul", ["h3", "w2"], ["y"], name="mm2"))
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(a, n) for a, n in ((wa, "wa"), (wb, "wb"), (b, "b"), (w2, "w2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    if path is not None:
        onnx.save(model, str(path))
    return model


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    make_mlp(path)
    return path


class ExportCache:
    """Exports each (source, exporter, attn, size, opset) once per test session."""

    def __init__(self, root: Path):
        self.root = root
        self.paths: dict[tuple, Path] = {}

    def get(self, source: str, exporter: str = "legacy", attn: str | None = None, size: str | None = None,
            opset: int | None = None) -> Path:
        key = (source, exporter, attn, size, opset)
        if key not in self.paths:
            from tqc.models.export import ExportSpec, export

            path = self.root / f"{source}-{size or 'default'}-{exporter}-{attn or 'auto'}-{opset or 'd'}.onnx"
            export(ExportSpec(source, exporter=exporter, attn=attn, size=size, opset=opset), path)
            self.paths[key] = path
        return self.paths[key]


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> ExportCache:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return ExportCache(tmp_path_factory.mktemp("exports"))
