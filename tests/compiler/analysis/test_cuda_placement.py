"""Which nodes ONNX Runtime CUDA places on the CPU for shape reasons (``cuda_placement``): ORT's walk on small
graphs built here, and on the fixtures as tqc compiles them for ort-cuda (ModernBERT, which captured a CUDA
graph on an H100, has none)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tqc.compiler.analysis.cuda_placement import host_placed_by_inference, host_placement_note
from tqc.compiler.io.model import load_model
from tqc.compiler.pipeline.manager import PassManager
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.passes.base import PassContext

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "transformers_5_17"


def _model(nodes, inits, elem=TensorProto.FLOAT, out_shape=None) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", elem, ["batch", "sequence", 8])
    y = helper.make_tensor_value_info("y", elem, out_shape)
    graph = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(np.array(v, np.int64), k)
                                                     for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _placed(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in host_placed_by_inference(model)]


def test_a_computed_reshape_target_runs_on_the_cpu_and_the_reshape_reads_it_from_host_memory():
    model = _model([
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["b"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["b", "axes"], ["b1"], name="unsqueeze"),
        helper.make_node("Concat", ["b1", "rest"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape"),
    ], {"zero": 0, "axes": [0], "rest": [-1, 8]})
    assert _placed(model) == ["gather", "unsqueeze", "concat"]  # Shape and Reshape stay on CUDA


def test_a_host_tensor_reshaped_by_a_constant_runs_on_the_cpu_but_not_a_half_precision_one():
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Reshape", ["s", "flat"], ["r"], name="reshape"),
             helper.make_node("Cast", ["r"], ["f"], name="cast", to=TensorProto.FLOAT16),
             helper.make_node("Mul", ["f", "f"], ["m"], name="mul"),  # reads float16: stays on CUDA
             helper.make_node("Cast", ["m"], ["mf"], name="back", to=TensorProto.FLOAT),
             helper.make_node("Mul", ["x", "mf"], ["y"], name="scale")]
    assert _placed(_model(nodes, {"flat": [-1]})) == ["reshape", "cast"]


def test_a_cast_to_its_own_type_is_dropped_as_ort_does_and_its_readers_still_read_the_host():
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Cast", ["s"], ["s64"], name="noop", to=TensorProto.INT64),
             helper.make_node("Slice", ["s64", "start", "end"], ["tail"], name="slice"),
             helper.make_node("Concat", ["start", "tail"], ["target"], name="concat", axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape")]
    assert _placed(_model(nodes, {"start": [0], "end": [3]})) == ["slice", "concat"]


def test_a_large_initializer_or_a_device_tensor_keeps_a_node_on_cuda():
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Mul", ["s", "big"], ["wide"], name="big_mul"),       # 101 elements: not small
             helper.make_node("ReduceMax", ["x"], ["peak"], name="peak", keepdims=0),
             helper.make_node("Cast", ["peak"], ["p64"], name="p64", to=TensorProto.INT64),
             helper.make_node("Add", ["s", "p64"], ["mixed"], name="mixed"),     # reads a device tensor
             helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape")]
    assert _placed(_model(nodes, {"big": np.arange(101).reshape(101, 1), "target": [-1]})) == []


def _compiled(fixture: str) -> onnx.ModelProto:
    model = load_model(FIXTURES / f"{fixture}-tiny.onnx")
    return PassManager(parse_pipeline("fold,fuse"), PassContext(target="ort-cuda"), verify="structure").run(model)


def test_modernbert_as_compiled_for_ort_cuda_places_nothing_on_the_cpu():
    placed = _placed(_compiled("modernbert"))
    assert placed == []
    assert "can capture CUDA graphs" in host_placement_note([])


def test_compile_for_ort_cuda_notes_the_blocking_nodes_and_explain_lists_them(tmp_path, capsys):
    import pytest

    from tqc.compiler.cli.main import main

    path = tmp_path / "m.onnx"
    onnx.save(_compiled_input(), path)
    notes = {}
    for target, explain in (("ort-cuda", ()), ("ort-cuda", ("--explain", "fold")), ("ort-cpu", ())):
        with pytest.raises(SystemExit) as info:
            main(["compile", str(path), "-p", "fold", "--target", target, "-o", str(tmp_path / f"{target}.onnx"),
                  *explain])
        assert info.value.code == 0
        notes[(target, bool(explain))] = [line for line in "\n".join(capsys.readouterr()).splitlines() if
                                          "cuda graphs" in line]
    first, = notes[("ort-cuda", False)]
    assert "place 3 shape-computing node(s) on the CPU" in first and "Gather 'sequence_read'" in first
    listed = notes[("ort-cuda", True)]
    assert [line.split("cuda graphs: ")[1] for line in listed[2:]] == [
        "Gather 'sequence_read' reads host tensor 's'", "Unsqueeze 'lift' reads host tensor 'seq'",
        "Concat 'target' reads host tensor 'seq1'"]
    assert notes[("ort-cpu", False)] == []


def test_the_python_api_gives_the_same_cuda_graphs_note():
    import tqc

    result = tqc.compile(_compiled_input(), "fold", target="ort-cuda", verify="structure")
    notes = [m for m in result.report["messages"] if m.startswith("cuda graphs:")]
    assert len(notes) == 1 and "place 3 shape-computing node(s)" in notes[0]
    assert not [m for m in tqc.compile(_compiled_input(), "fold", target="trt", verify="structure").report["messages"]
                if m.startswith("cuda graphs:")]


def _compiled_input() -> onnx.ModelProto:
    return _model([
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "one"], ["seq"], name="sequence_read", axis=0),
        helper.make_node("Unsqueeze", ["seq", "axes"], ["seq1"], name="lift"),
        helper.make_node("Concat", ["seq1", "rest"], ["target"], name="target", axis=0),
        helper.make_node("Reshape", ["x", "target"], ["r"], name="reshape"),  # [S, B*8]: no 0 copies S there
        helper.make_node("Relu", ["r"], ["y"], name="relu"),
    ], {"one": 1, "axes": [0], "rest": [-1]}, out_shape=[None, None])
