import json
import shlex
import subprocess
import sys

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from tqc.compiler.core.errors import VerificationError
from tqc.compiler.pipeline.manager import PassManager
from tqc.passes.base import Pass, PassContext, PassResult, Tolerance
from tqc.passes.fold import Fold

from tests.conftest import make_mlp


class ScaleWeight(Pass):
    """Test pass: multiplies the second weight by (1 + eps), changing the outputs slightly."""

    name = "scale-weight-test"
    tolerance = Tolerance(atol=1e-6, rtol=1e-6)

    def __init__(self, eps: float = 1e-2):
        super().__init__()
        self.eps = eps

    def run(self, graph, ctx):
        w2 = graph.tensors()["w2"]
        w2.values = (w2.values * (1 + self.eps)).astype(np.float32)
        return PassResult(True, {"scaled": 1})


class RenameOutput(Pass):
    """Test pass: renames the graph output, which the manager must refuse."""

    name = "rename-output-test"

    def run(self, graph, ctx):
        graph.outputs[0].name = "renamed"
        return PassResult(True)


class CastOutput(Pass):
    """Test pass: changes the output dtype to float16."""

    name = "cast-output-test"

    def run(self, graph, ctx):
        out = graph.outputs[0]
        producer = out.inputs[0]
        mid = gs.Variable("pre_cast", dtype=np.float32)
        producer.outputs = [mid]
        graph.nodes.append(gs.Node("Cast", inputs=[mid], outputs=[out], attrs={"to": 10}))
        out.dtype = np.float16
        return PassResult(True)


def test_fold_passes_numeric_verification_and_dumps(tmp_path):
    dump = tmp_path / "dump"
    manager = PassManager([Fold()], PassContext(), verify="numeric", dump_dir=dump)
    result = manager.run(make_mlp())
    assert not any(n.op_type == "Identity" for n in result.graph.node)
    record = manager.records[0]
    assert record.verify["structure"] == "ok"
    assert record.verify["numeric"]["passed"] is True
    assert record.verify["numeric"]["outputs"]["y"]["max_abs"] == 0.0
    names = sorted(p.name for p in dump.iterdir())
    assert names == ["00_input.onnx", "00_input.outputs.json", "01_fold.onnx", "01_fold.outputs.json",
                     "01_fold.report.json", "inputs.json"]
    stage = json.loads((dump / "01_fold.report.json").read_text())
    assert stage["stats"]["identity_removed"] == 1


def test_numeric_failure_gives_a_working_polygraphy_reproducer(tmp_path):
    manager = PassManager([Fold(), ScaleWeight()], PassContext(), verify="numeric", dump_dir=tmp_path)
    with pytest.raises(VerificationError) as info:
        manager.run(make_mlp())
    message = str(info.value)
    assert message.startswith("02_scale-weight-test: outputs differ")
    assert "'y'" in message
    command = info.value.reproducer
    assert command.startswith("polygraphy run ") and "--load-outputs" in command
    assert "ORT_DISABLE_ALL" in command
    # The command really reproduces the failure with polygraphy itself ...
    argv = shlex.split(command)
    polygraphy = [_polygraphy_bin()]
    failing = subprocess.run(polygraphy + argv[1:], capture_output=True, text=True)
    assert failing.returncode != 0, failing.stdout[-2000:]
    assert "FAILED" in failing.stdout + failing.stderr
    # ... and with a loose tolerance, the same comparison passes.
    loose = [a for a in argv[1:]]
    loose[loose.index("--atol") + 1] = "10"
    passing = subprocess.run(polygraphy + loose, capture_output=True, text=True)
    assert passing.returncode == 0, passing.stdout[-2000:]


def _polygraphy_bin() -> str:
    from pathlib import Path

    candidate = Path(sys.executable).parent / "polygraphy"
    return str(candidate) if candidate.exists() else "polygraphy"


def test_reproducer_without_dump_dir_goes_to_a_temp_folder():
    manager = PassManager([ScaleWeight()], PassContext(), verify="numeric")
    with pytest.raises(VerificationError) as info:
        manager.run(make_mlp())
    model_path = shlex.split(info.value.reproducer)[2]
    from pathlib import Path

    assert Path(model_path).exists()


def test_renamed_output_is_refused():
    manager = PassManager([RenameOutput()], PassContext(), verify="structure")
    with pytest.raises(VerificationError, match=r"graph outputs changed from \['y'\] to \['renamed'\]"):
        manager.run(make_mlp())


def test_changed_output_dtype_is_refused():
    manager = PassManager([CastOutput()], PassContext(), verify="structure")
    with pytest.raises(VerificationError, match="graph output changed from y \\(float, rank 2\\) to y \\(float16"):
        manager.run(make_mlp())


def test_verify_none_skips_checks():
    manager = PassManager([RenameOutput()], PassContext(), verify="none")
    result = manager.run(make_mlp())
    assert result.graph.output[0].name == "renamed"


def test_report_has_stats_and_timings():
    manager = PassManager([Fold()], PassContext(target="ort-cpu"), verify="structure")
    manager.run(make_mlp())
    report = manager.report()
    assert report["target"] == "ort-cpu"
    assert report["stages"][0]["stats"]["nodes_before"] > report["stages"][0]["stats"]["nodes_after"]
    assert report["stages"][0]["seconds"] > 0
