import pytest

from tqc.compiler.core.errors import TqcError
from tqc.compiler.pipeline.spec import format_pipeline, parse_pipeline, split_top_level
from tqc.passes.base import Option, Pass, PassResult, parse_bool, parse_list
from tqc.passes.registry import available, register


@register
class _Tunable(Pass):
    """Test-only pass with options of every type."""

    name = "tunable-test"
    options = {
        "method": Option(str, "max", "calibration method", choices=("max", "percentile", "entropy")),
        "percentile": Option(float, 99.99, "percentile"),
        "bins": Option(int, 2048, "histogram bins"),
        "residual": Option(parse_bool, False, "quantize residual adds"),
        "exclude": Option(parse_list, [], "node name patterns"),
    }

    def run(self, graph, ctx):
        return PassResult(False)


def test_split_respects_braces():
    assert split_top_level("fold,qdq{a=1,b=2},fuse") == ["fold", "qdq{a=1,b=2}", "fuse"]


def test_parse_plain_and_options():
    passes = parse_pipeline("fold, tunable-test{method=percentile,percentile=99.9,bins=512,residual=true,"
                            "exclude=*down*|*pooler*}")
    assert [p.name for p in passes] == ["fold", "tunable-test"]
    values = passes[1].values
    assert values == {"method": "percentile", "percentile": 99.9, "bins": 512, "residual": True,
                      "exclude": ["*down*", "*pooler*"]}


def test_spec_round_trips():
    text = "fold,tunable-test{bins=512,method=entropy}"
    passes = parse_pipeline(text)
    assert format_pipeline(passes) == text
    assert format_pipeline(parse_pipeline(format_pipeline(passes))) == text


@pytest.mark.parametrize("text, message", [
    ("fodl", "unknown pass 'fodl' (did you mean 'fold'?)"),
    ("fold,,fold", "empty pass name"),
    ("tunable-test{methd=max}", "has no option 'methd' (did you mean 'method'?)"),
    ("tunable-test{method=entopy}", "must be one of max, percentile, entropy (did you mean 'entropy'?)"),
    ("tunable-test{bins=many}", "option 'bins' of pass 'tunable-test' takes a integer, got 'many'"),
    ("tunable-test{residual=maybe}", "takes a boolean"),
    ("tunable-test{bins}", "needs a value"),
    ("tunable-test{bins=1", "missing '}'"),
    ("fold{x=1}", "pass 'fold' takes no options"),
    ("", "empty pipeline"),
])
def test_errors_are_one_line(text, message):
    with pytest.raises(TqcError) as info:
        parse_pipeline(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_registry_lists_builtin_passes_with_summaries():
    passes = available()
    assert "fold" in passes
    assert passes["fold"].summary().startswith("Constant folding")
