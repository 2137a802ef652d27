"""``tqc check-triton``: export-triton repositories loaded by tritonserver (config) and ONNX Runtime (files)."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import pytest

from tests.conftest import make_mlp
from tqc.compiler.core.errors import TqcError
from tqc.compiler.tools.serve.triton_dist import find_triton
from tqc.compiler.tools.triton import export_triton

try:
    find_triton()
except TqcError as exc:  # pragma: no cover - the serve extra is part of dev
    pytest.skip(f"no tritonserver here: {exc}", allow_module_level=True)

from tqc.compiler.tools.serve.repo_check import check_triton_repository  # noqa: E402


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    make_mlp(tmp_path / "mlp.onnx")
    export_triton(tmp_path / "mlp.onnx", tmp_path / "repo", kind="KIND_CPU")
    return tmp_path / "repo"


def test_an_exported_repository_is_accepted_by_triton_and_loads(repo):
    [row] = check_triton_repository(repo)
    assert row["ok"], row
    assert "config accepted" in row["triton"] and "onnxruntime backend" in row["triton"]
    assert row["files"].startswith("ok")


def test_a_broken_config_is_reported_by_triton(repo):
    config = repo / "mlp" / "config.pbtxt"
    config.write_text(config.read_text().replace("TYPE_FP32", "TYPE_BOGUS"))
    [row] = check_triton_repository(repo)
    assert not row["ok"] and "config.pbtxt" in row["triton"]


def test_a_config_that_disagrees_with_the_model_is_reported(repo):
    config = repo / "mlp" / "config.pbtxt"
    config.write_text(config.read_text().replace("dims: [ 3 ]", "dims: [ 5 ]"))
    [row] = check_triton_repository(repo)
    assert row["triton"].startswith("ok") and not row["ok"]
    assert "'y' has dims [3]" in row["files"]


def test_weights_left_behind_are_found_missing(tmp_path):
    model = make_mlp()
    onnx.save(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    export_triton(tmp_path / "ext.onnx", tmp_path / "repo", kind="KIND_CPU")  # copies only ext.onnx(.data)
    [row] = check_triton_repository(tmp_path / "repo")
    if (tmp_path / "repo" / "ext" / "1" / "weights.bin").exists():  # export-triton learnt to ship it
        assert row["ok"], row
    else:
        assert not row["ok"] and "cannot load" in row["files"], row
    shutil.rmtree(tmp_path / "repo")
