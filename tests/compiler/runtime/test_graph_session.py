"""GraphSession runs a gs graph on ORT without exporting it; calibration and compile go through it."""

import numpy as np
import onnx

from tqc.compiler.runtime.activations import stream_intermediates
from tqc.compiler.analysis.calibration import calibrate, calibration_targets
from tqc.compiler.tools.compile import CompileOptions, compile_model
from tqc.compiler.runtime.feeds import synthesize_feeds
from tqc.compiler.io.graph import to_graph
from tqc.compiler.runtime.graph_session import GraphSession
from tqc.compiler.pipeline.manager import PassManager
from tqc.compiler.io.model import load_model
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.compiler.io.structure import infer_shapes
from tqc.passes.base import PassContext


def _collect(model_or_graph, feeds, names):
    seen: dict[str, list] = {}
    stream_intermediates(model_or_graph, feeds, lambda n, v: seen.setdefault(n, []).append(v), names=names)
    return seen


def test_graph_session_equals_a_session_on_the_exported_model(exports):
    model = infer_shapes(load_model(exports.get("bert", size="tiny")), strict=False)
    graph = to_graph(model)
    feeds = synthesize_feeds(model, count=2)
    names = calibration_targets(model)
    via_graph = _collect(graph, feeds, names)
    via_model = _collect(model, feeds, names)
    assert via_graph.keys() == via_model.keys() and len(via_graph) >= 8
    for name in via_model:
        for a, b in zip(via_graph[name], via_model[name]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    session = GraphSession(graph)
    assert session.output_names == [o.name for o in model.graph.output]
    assert len(session._borrowed) >= 10  # the big weights were lent, not copied into the model


def test_calibration_on_the_graph_equals_calibration_on_the_model(exports):
    model = infer_shapes(load_model(exports.get("bert", size="tiny")), strict=False)
    feeds = synthesize_feeds(model, count=2)
    names = calibration_targets(model)
    on_model = calibrate(model, feeds, names, histograms=False)
    on_graph = calibrate(to_graph(model), feeds, names, histograms=False)
    assert on_model.tensors.keys() == on_graph.tensors.keys()
    for name, r in on_model.tensors.items():
        assert abs(r.max - on_graph.tensors[name].max) <= 1e-5 * max(1.0, abs(r.max))
    assert on_model.model_hash == on_graph.model_hash


def test_compile_writes_what_the_manager_returns(exports, tmp_path):
    """compile's lean path (weights read into arrays, written from them) gives the same model as
    PassManager.run on a fully loaded ModelProto."""
    source = exports.get("bert", size="tiny")
    out = tmp_path / "fused.onnx"
    compile_model(CompileOptions(model=str(source), pipeline="fold,fuse", output=str(out), target="ort-cpu"))
    expected = PassManager(parse_pipeline("fold,fuse"), PassContext(target="ort-cpu")).run(load_model(source))
    written = load_model(out)
    assert [(n.op_type, list(n.input), list(n.output)) for n in written.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in expected.graph.node]
    want = {t.name: onnx.numpy_helper.to_array(t) for t in expected.graph.initializer}
    got = {t.name: onnx.numpy_helper.to_array(t) for t in written.graph.initializer}
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    assert written.opset_import == expected.opset_import
    assert {p.key: p.value for p in written.metadata_props} == {p.key: p.value for p in expected.metadata_props}
