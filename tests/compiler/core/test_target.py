"""The target table: one Target per name, resolved in one place, and the facts the passes read from it."""

from __future__ import annotations

import pytest

from tqc.compiler.core.errors import TqcError
from tqc.compiler.core.target import TARGETS, Target
from tqc.compiler.tools.compile import CompileOptions, compile_model
from tqc.passes.base import PassContext


def test_every_name_resolves_to_its_one_target() -> None:
    assert TARGETS == ("trt", "ort-cpu", "ort-cuda", "openvino")
    for name in TARGETS:
        target = Target.named(name)
        assert target.name == name and str(target) == name and Target.named(name) is target
        assert PassContext(target=name).target is target  # a script's name is resolved by Target.named
    assert PassContext().target is Target.named("trt")


@pytest.mark.parametrize("name, suggestion", [("ort_cpu", "ort-cpu"), ("tensorrt", "trt"), ("openvin", "openvino")])
def test_an_unknown_name_is_one_readable_error(name, suggestion) -> None:
    with pytest.raises(TqcError, match=f"unknown target '{name}' \\(did you mean '{suggestion}'\\?\\)"):
        Target.named(name)


def test_compile_refuses_an_unknown_target_before_reading_anything(tmp_path) -> None:
    missing = tmp_path / "missing.onnx"  # never read: the target is resolved first
    with pytest.raises(TqcError, match="unknown target 'ortcpu' \\(did you mean 'ort-cpu'\\?\\)"):
        compile_model(CompileOptions(model=str(missing), pipeline="fold", output=str(tmp_path / "o.onnx"),
                                     target="ortcpu"))

