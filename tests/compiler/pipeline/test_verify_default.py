"""Numeric verification is the default: every pass is compared before/after on small inputs drawn within the
model's limits, so a pass that changes the answer cannot exit 0; ``--verify structure`` opts out."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tqc.compiler.cli.main import main
from tqc.compiler.tools.compile import CompileOptions
from tqc.compiler.runtime.feeds import input_roles, max_positions, verification_feeds
from tqc.compiler.io.model import load_model
from tqc.passes import registry
from tqc.passes.base import Pass, PassResult, Tolerance


class PerturbWeight(Pass):
    """Test pass: scales the last MatMul weight by 1.1 -- a change of the answer, nothing structural."""

    name = "perturb-test"
    tolerance = Tolerance(atol=1e-4, rtol=1e-4)

    def run(self, graph, ctx):
        for node in reversed(graph.nodes):
            if node.op == "MatMul" and hasattr(node.inputs[1], "values"):
                node.inputs[1].values = (node.inputs[1].values * 1.1).astype(np.float32)
                return PassResult(True, {"perturbed": 1})
        return PassResult(False)


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(list(args))
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def test_a_pass_that_changes_the_answer_fails_by_default(exports, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, PerturbWeight.name, PerturbWeight)
    path = exports.get("bert", size="tiny")
    out = tmp_path / "o.onnx"
    code, _, err = run_cli(["-q", "compile", str(path), "-p", "fold,perturb-test", "-o", str(out)], capsys)
    assert code == 1, err
    assert "tqc: verification failed: 02_perturb-test: outputs differ" in err
    assert "reproduce with: polygraphy run" in err
    assert not out.exists()
    # The explicit opt-out checks the structure only, and the change passes unseen.
    code, _, err = run_cli(["-q", "compile", str(path), "-p", "fold,perturb-test", "-o", str(out), "--verify",
                            "structure"], capsys)
    assert code == 0, err


def test_default_report_is_numeric_and_exact(exports, tmp_path, capsys):
    assert CompileOptions(model="m", pipeline="fold", output="o").verify == "numeric"
    path = exports.get("bert", size="tiny")
    report = tmp_path / "r.json"
    code, stdout, err = run_cli(["-q", "compile", str(path), "-p", "fold,fuse", "--target", "ort-cpu", "-o",
                                 str(tmp_path / "o.onnx"), "--report", str(report)], capsys)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["verify"] == "numeric"
    for stage in data["stages"]:
        numeric = stage["verify"]["numeric"]
        assert numeric["passed"] and numeric["outputs"]["last_hidden_state"]["max_abs"] <= 1e-4
    assert "(target ort-cpu, verify numeric)" in stdout


def test_verification_inputs_stay_within_the_model(tmp_path, capsys):
    """A model with 10 positions (8 usable after RoBERTa's offset): drawn sequences fit, ids fit the vocabulary."""
    from tqc.models.recipes import find_recipe

    config = find_recipe("roberta").config("tiny")
    config.max_position_embeddings = 10
    config.save_pretrained(tmp_path / "cfg")
    path = tmp_path / "short.onnx"
    code, _, err = run_cli(["-q", "export", str(tmp_path / "cfg" / "config.json"), "-o", str(path), "--exporter",
                            "dynamo"], capsys)
    assert code == 0, err
    model = load_model(path)
    assert max_positions(model) == 8
    feeds = verification_feeds(model)
    roles = input_roles(model)
    ids = next(name for name, role in roles.items() if role == "input_ids")
    mask = next(name for name, role in roles.items() if role == "attention_mask")
    assert [f[ids].shape for f in feeds] == [(2, 8), (3, 8)]  # two shapes, sequence clamped to the table
    assert all(0 <= f[ids].min() and f[ids].max() < 1000 for f in feeds)
    assert all(f[mask].min() == 0 for f in feeds)  # padded rows exercise the masking path
    code, _, err = run_cli(["-q", "compile", str(path), "-p", "fold", "-o", str(tmp_path / "o.onnx")], capsys)
    assert code == 0, err


# The two silent wrong outputs of issue #10, put back on purpose: the default verification refuses each (exit 1),
# where `--verify structure` (the old default) let them through with exit 0.

def test_default_verification_catches_positions_read_wrong(tmp_path, capsys, monkeypatch):
    """The old EmbedLayerNormalization bug on a BERT without token_type_ids: every token read position row 0."""
    import numpy as np
    import onnx_graphsurgeon as gs

    import tqc.passes.fuse as fuse_package
    from tests.fixtures.byom import onnx_path

    model = onnx_path("st-bert-optimum-pooled")
    if not model.exists():
        pytest.skip(f"fixture model {model} missing")
    original = fuse_package.fuse_embed_layernorm

    def positions_all_zero(graph, *args, **kwargs):
        result = original(graph, *args, **kwargs)
        for node in graph.nodes:
            if node.op == "EmbedLayerNormalization" and isinstance(node.inputs[3], gs.Constant):
                table = node.inputs[3].values
                node.inputs[3] = gs.Constant(node.inputs[3].name + "_bug", np.repeat(table[:1], len(table), 0))
        return result

    monkeypatch.setattr(fuse_package, "fuse_embed_layernorm", positions_all_zero)
    out = tmp_path / "o.onnx"
    code, _, err = run_cli(["-q", "compile", str(model), "-p", "fuse", "--target", "ort-cpu", "-o", str(out)], capsys)
    assert code == 1 and "01_fuse: outputs differ" in err, err
    assert not out.exists()
    code, _, err = run_cli(["-q", "compile", str(model), "-p", "fuse", "--target", "ort-cpu", "-o", str(out),
                            "--verify", "structure"], capsys)
    assert code == 0, err  # what the old default let through


def test_default_verification_catches_a_shared_weight_smoothed_for_one_consumer(tmp_path, capsys, monkeypatch):
    """The old ALBERT bug: one weight smoothed for its first consumer served every consumer, each of which
    divided its input by its own SmoothQuant vector."""
    import numpy as np
    import onnx

    from tests.passes.test_qdq import _shared_weight_feeds, shared_weight_model
    from tqc.passes.qdq.insert import Quantizer

    def own_vector_per_consumer(self, site, alpha):
        inputs = self._smoothing_inputs(site)
        if inputs is None:
            return None
        cmin, cmax, weight, _ = inputs
        return self._factors(np.maximum(np.abs(cmin), np.abs(cmax)), weight, site.weight_axis, alpha)

    monkeypatch.setattr(Quantizer, "smoothing_vector", own_vector_per_consumer)
    model = tmp_path / "shared.onnx"
    onnx.save(shared_weight_model(), str(model))
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.concatenate([f["x"] for f in _shared_weight_feeds(4, 0)]))
    out = tmp_path / "q.onnx"
    args = ["-q", "compile", str(model), "-p", "qdq", "--target", "trt", "--calib", str(data), "-o", str(out)]
    code, _, err = run_cli(args, capsys)
    assert code == 1 and "01_qdq: outputs differ" in err, err
    assert not out.exists()
    code, _, err = run_cli([*args, "--verify", "structure"], capsys)
    assert code == 0, err  # what the old default let through
