"""Numeric verification is the default: every pass is compared before/after on small inputs drawn within the
model's limits, so a pass that changes the answer cannot exit 0; ``--verify structure`` opts out."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tqc.compiler.cli import main
from tqc.compiler.compile import CompileOptions
from tqc.compiler.feeds import input_roles, max_positions, verification_feeds
from tqc.compiler.model_io import load_model
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
    assert "tqc: reproduce with: polygraphy run" in err
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
