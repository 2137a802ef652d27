"""The public Python API (``tqc.compile``, ``tqc.PassManager``, ``tqc.diff``, ``tqc.export``, ``tqc.passes``)
against the CLI: the same pipeline on the same model gives the same bytes and the same numbers, the same
mistakes the same one-line messages, and the same defaults.

MiniLM (the packaged all-MiniLM-L6-v2, real weights) for the end-to-end comparisons; the conftest's small MLP
where the question is the API's own behaviour (calibration forms, saving, pass objects)."""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import tqc
from tqc.compiler.cli.main import cli, main
from tqc.passes import Fold, Fp16, Fuse, Pass, PassResult, Qdq, Tolerance
from tests.conftest import make_mlp

REPO = Path(__file__).resolve().parents[1]
SENTENCES = REPO / "models" / "data" / "calib_sentences.txt"


def run_cli(args, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def outputs(path_or_model, feed: dict) -> list[np.ndarray]:
    data = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feed)


def comparable(report: dict) -> list:
    """The numbers of a report that do not depend on the clock: per stage its spec, stats and verification."""
    def numbers(verify: dict) -> dict:
        return {k: v for k, v in verify.items() if k != "seconds"}
    return [(s["spec"], s["modified"], s["stats"], numbers(s["verify"])) for s in report["stages"]]


def sentences() -> list[str]:
    return SENTENCES.read_text().splitlines()


# ---------------------------------------------------------------- MiniLM: the API and the CLI side by side

@pytest.fixture(scope="module")
def minilm_cli(exports, tmp_path_factory):
    """MiniLM compiled by the CLI: fold,fuse,qdq for ort-cpu on the shipped sentences (the first 32)."""
    folder = tmp_path_factory.mktemp("minilm-cli")
    model = exports.get("minilm")
    out, report = folder / "cli.onnx", folder / "cli.json"
    with pytest.raises(SystemExit) as info:
        main(["-q", "compile", str(model), "-p", "fold,fuse,qdq", "--target", "ort-cpu", "--calib", str(SENTENCES),
              "-o", str(out), "--report", str(report)])
    assert info.value.code == 0
    return model, out, json.loads(report.read_text())


def test_compile_gives_the_clis_bytes_and_numbers(minilm_cli, tmp_path, capsys):
    model, cli_out, cli_report = minilm_cli
    result = tqc.compile(model, [Fold(), Fuse(), Qdq()], target="ort-cpu", calib=SENTENCES)
    assert result.save(tmp_path / "api.onnx") == tmp_path / "api.onnx"
    assert digest(tmp_path / "api.onnx") == digest(cli_out)
    assert comparable(result.report) == comparable(cli_report)
    assert result.report["input"] == cli_report["input"]  # path, sha256 of the file, nodes
    assert result.report["output"] == {"path": str(tmp_path / "api.onnx"), "nodes": cli_report["output"]["nodes"]}
    assert result.report["verify"] == "numeric" and result.modified
    # printed as tqc compile prints it: the same line per pass once the clock is taken out
    code, stdout, _ = run_cli(["-q", "compile", str(model), "-p", "fold,fuse,qdq", "--target", "ort-cpu", "--calib",
                               str(SENTENCES), "-o", str(tmp_path / "again.onnx")], capsys)
    assert code == 0
    def stages(text: str) -> list[str]:
        return [re.sub(r"\d+\.\d+s", "_s", line) for line in text.splitlines()[1:-1]]
    assert stages(str(result.report)) == stages(stdout.strip())
    assert json.loads(result.report.to_json())["stages"][2]["stats"] == cli_report["stages"][2]["stats"]


def test_texts_calibrate_as_the_txt_file(minilm_cli, tmp_path):
    model, cli_out, _ = minilm_cli
    texts = sentences()[:32]  # what --calib-samples 32 reads from the file
    for tokenizer in (None, "minilm"):  # the recorded tokenizer, then named
        result = tqc.compile(model, "fold,fuse,qdq", target="ort-cpu", calib=texts, tokenizer=tokenizer)
        result.save(tmp_path / f"texts-{tokenizer}.onnx")
        assert digest(tmp_path / f"texts-{tokenizer}.onnx") == digest(cli_out)


def test_a_model_object_compiles_as_its_file_and_is_left_unchanged(minilm_cli, tmp_path):
    model_path, cli_out, cli_report = minilm_cli
    model = onnx.load(str(model_path))
    before = model.SerializeToString()
    result = tqc.PassManager("fold,fuse,qdq", target="ort-cpu", calib=SENTENCES)(model)
    assert model.SerializeToString() == before
    result.save(tmp_path / "object.onnx")
    assert digest(tmp_path / "object.onnx") == digest(cli_out)
    assert result.report["input"]["path"] == "<onnx.ModelProto>" and result.report["input"]["hash"] is None
    assert comparable(result.report) == comparable(cli_report)
    # .model is the saved model, as an object
    assert result.model == onnx.load(str(tmp_path / "object.onnx"))


def test_diff_gives_the_clis_numbers(minilm_cli, tmp_path, capsys):
    model, cli_out, _ = minilm_cli
    held_out = sentences()[32:]
    (tmp_path / "held.txt").write_text("\n".join(held_out) + "\n")
    code, stdout, err = run_cli(["-q", "diff", str(model), str(cli_out), "--data", str(tmp_path / "held.txt"),
                                 "--json", str(tmp_path / "d.json")], capsys)
    assert code == 0, err
    cli_row = json.loads((tmp_path / "d.json").read_text())["results"][0]["outputs"][0]
    result = tqc.diff(model, cli_out, data=held_out)
    assert result.cosine == cli_row["cosine"] and 0.99 < result.cosine < 1
    assert result.outputs["last_hidden_state"].max_abs == cli_row["max_abs"]
    assert result.as_dict()["outputs"][0] == cli_row
    assert str(result).splitlines() == stdout.splitlines()[:3]  # the candidate's name, the table's header and row
    assert len(result.inputs) == 2 and result.inputs[0]["input_ids"].shape[0] == 8  # 16 samples, batches of 8


# ---------------------------------------------------------------- calibration data: every form, one answer

@pytest.fixture
def mlp_data() -> np.ndarray:
    return np.random.default_rng(3).standard_normal((32, 4)).astype(np.float32)


def saved_bytes(result, path: Path) -> bytes:
    return result.save(path).read_bytes()


def test_every_calibration_form_gives_the_same_model(tmp_path, mlp_data):
    make_mlp(tmp_path / "mlp.onnx")
    np.savez(tmp_path / "calib.npz", x=mlp_data)
    batches = [{"x": mlp_data[i:i + 8]} for i in range(0, 32, 8)]
    from polygraphy.json import save_json

    save_json(batches, str(tmp_path / "calib.json"))
    forms = {"npz": str(tmp_path / "calib.npz"), "json": tmp_path / "calib.json", "dict": {"x": mlp_data},
             "list": batches, "tuple": tuple(batches), "generator": (batch for batch in batches)}
    saved = {name: saved_bytes(tqc.compile(tmp_path / "mlp.onnx", [Fold(), Qdq()], calib=data),
                               tmp_path / f"{name}.onnx") for name, data in forms.items()}
    assert len(set(saved.values())) == 1, {k: hashlib.sha256(v).hexdigest()[:8] for k, v in saved.items()}
    quantized = onnx.load_from_string(saved["dict"])
    assert sum(n.op_type == "QuantizeLinear" for n in quantized.graph.node) == 2
    # and the CLI, on the .npz: the same bytes
    with pytest.raises(SystemExit) as info:
        main(["-q", "compile", str(tmp_path / "mlp.onnx"), "-p", "fold,qdq", "--calib", str(tmp_path / "calib.npz"),
              "-o", str(tmp_path / "cli.onnx")])
    assert info.value.code == 0 and (tmp_path / "cli.onnx").read_bytes() == saved["npz"]


def test_a_generator_is_read_once_and_only_up_to_calib_samples(mlp_data):
    pulled = []

    def endless():
        while True:
            pulled.append(len(pulled))
            yield {"x": mlp_data[:8]}

    result = tqc.compile(make_mlp(), "fold,qdq", calib=endless(), calib_samples=16)
    assert len(pulled) == 2  # 16 samples in batches of 8; calibration's two passes reuse them
    assert result.report["stages"][1]["verify"]["numeric"]["passed"]


@pytest.mark.parametrize("calib, message", [
    (42, "calib must be a path, a list of texts, a dict of arrays (input name -> array) or an iterable of such "
         "dicts, got int"),
    (["a text", 3], "calib: item 1 of the list of texts is int, not a text"),
    ({"x": "not an array"}, "calib: 'x' is not an array with the batch on axis 0 (got str)"),
    ({"y": np.zeros((8, 4), np.float32)}, "calib (a dict of 1 array) batch 0: no data for model input 'x' "
                                          "(data has y)"),
    ([{"x": np.zeros((8, 4), np.float32)}, [1, 2]], "calib yielded list as item 1; each item must be a dict of "
                                                    "input name -> array"),
    ([], "calib (a list of 0 feeds) holds no samples"),
])
def test_calibration_data_that_does_not_fit_is_one_line(calib, message):
    with pytest.raises(tqc.TqcError) as info:
        tqc.compile(make_mlp(), "fold,qdq", calib=calib)
    assert str(info.value) == message


# ---------------------------------------------------------------- pass objects and settings: the CLI's checks

@pytest.mark.parametrize("text, make", [
    ("qdq{percentile=150}", lambda: Qdq(percentile=150)),
    ("qdq{smoth=0.5}", lambda: Qdq(smoth=0.5)),
    ("qdq{method=percentil}", lambda: Qdq(method="percentil")),
    ("fp16{margin=0}", lambda: Fp16(margin=0)),
    ("fuse{mask=left}", lambda: Fuse(mask="left")),
    ("fold{x=1}", lambda: Fold(x=1)),
    ("qdq{smooth=abc}", lambda: Qdq(smooth="abc")),
    ("qdq{smooth=nan}", lambda: Qdq(smooth=float("nan"))),
])
def test_pass_options_are_refused_with_the_clis_line(text, make, mlp_path, tmp_path, capsys):
    code, _, err = run_cli(["compile", str(mlp_path), "-p", text, "-o", str(tmp_path / "o.onnx")], capsys)
    assert code == 2
    with pytest.raises(tqc.TqcError) as from_object:
        make()
    with pytest.raises(tqc.TqcError) as from_text:
        tqc.compile(mlp_path, text)
    assert err.strip() == f"tqc: error: {from_object.value}" == f"tqc: error: {from_text.value}"
    assert not (tmp_path / "o.onnx").exists()


def test_pass_objects_take_python_values_and_print_as_python():
    assert Qdq(smooth="0.5").values == Qdq(smooth=0.5).values  # text parsed as the pipeline text is
    percentile = Qdq(percentile=99).values["percentile"]
    assert percentile == 99.0 and isinstance(percentile, float)
    assert Qdq(exclude=("*a*", "*b*")).spec() == "qdq{exclude=*a*|*b*}"
    assert repr(Qdq(method="percentile", exclude=["*p*"])) == "Qdq(exclude=['*p*'], method='percentile')"
    assert repr(Fold()) == "Fold()"
    for bad, message in [(lambda: Qdq(smooth=True), "option 'smooth' of pass 'qdq' takes a number, got True (bool)"),
                         (lambda: Fuse(attention="maybe"),
                          "option 'attention' of pass 'fuse' takes a boolean, got 'maybe'"),
                         (lambda: Qdq(exclude=[1]), "option 'exclude' of pass 'qdq' takes a list of texts (or "
                                                    "'|'-separated text), got [1] (list)")]:
        with pytest.raises(tqc.TqcError) as info:
            bad()
        assert str(info.value) == message


@pytest.mark.parametrize("settings, message", [
    (dict(passes=[Fold, Fuse()]), "passes[0] is the class Fold: give an instance, Fold()"),
    (dict(passes=[]), "empty pipeline: give passes, e.g. [Fold()] or 'fold'"),
    (dict(passes=[Fold(), 3]), "passes[1] is int, not a pass (tqc.passes.Fold(), ...) or pipeline text"),
    (dict(passes="fold", target="tpu"), "unknown target 'tpu' (did you mean 'ort-cpu'?)"),
    (dict(passes="fold", verify="full"), "--verify must be one of none, structure, numeric"),
    (dict(passes="fold", batch_size=0), "Invalid value for 'batch_size': 0 is not in the range x>=1"),
    (dict(passes="fold", calib_samples=-1), "Invalid value for 'calib_samples': -1 is not in the range x>=1"),
    (dict(passes="qdq", calib=[{"x": 1}], calib_table="t.json"), "give either calib or calib_table, not both"),
    (dict(passes="fold", explain=["fusion"]), "unknown pass 'fusion' (did you mean 'fuse'?)"),
    (dict(passes="qdq"), "pass 'qdq' requires calibration data: give --calib DATA or --calib-table TABLE"),
])
def test_settings_are_refused_in_one_line(settings, message, mlp_path):
    passes = settings.pop("passes")
    with pytest.raises(tqc.TqcError) as info:
        tqc.PassManager(passes, **settings)(mlp_path)
    assert str(info.value) == message


def test_the_defaults_are_the_clis():
    """Each keyword default of the API equals the default of the CLI option that does the same."""
    def cli_defaults(command: str) -> dict:
        import click

        context = click.Context(cli.commands[command])
        return {p.name: p.get_default(context) for p in cli.commands[command].params}

    def api_defaults(function) -> dict:
        return {name: p.default for name, p in inspect.signature(function).parameters.items()
                if p.default is not inspect.Parameter.empty}

    compile_cli, compile_api = cli_defaults("compile"), api_defaults(tqc.compile)
    for name in ("target", "verify", "calib_samples", "batch_size", "max_length", "runtime", "tokenizer",
                 "input_map", "calib", "calib_table", "dump_dir", "allow_table_mismatch"):
        assert compile_api[name] == compile_cli[name], name
    assert compile_api["verify"] == "numeric"
    assert api_defaults(tqc.PassManager.__init__) == {k: v for k, v in compile_api.items()}
    diff_cli, diff_api = cli_defaults("diff"), api_defaults(tqc.diff)
    for name in ("data", "samples", "batch_size", "layerwise", "threshold", "tokenizer", "mask_padding", "runtime",
                 "sensitivity", "input_map"):
        assert diff_api[name] == diff_cli[name], name
    export_cli, export_api = cli_defaults("export"), api_defaults(tqc.export)
    for name in ("exporter", "attn", "opset", "size", "seed", "task"):
        assert export_api[name] == export_cli[name], name


# ---------------------------------------------------------------- verification: numeric by default

class ScaleLastWeight(Pass):
    """Test pass: scales the last MatMul's weight by 1.1, a change of the answer and nothing structural."""

    name = "scale-test"
    tolerance = Tolerance(atol=1e-4, rtol=1e-4)

    def run(self, graph, ctx):
        node = next(n for n in reversed(graph.nodes) if n.op == "MatMul")
        node.inputs[1].values = (node.inputs[1].values * 1.1).astype(np.float32)
        return PassResult(True, {"scaled": 1})


def test_a_pass_that_changes_the_answer_raises_by_default(tmp_path):
    with pytest.raises(tqc.VerificationError) as info:
        tqc.compile(make_mlp(), [Fold(), ScaleLastWeight()])
    assert str(info.value).startswith("02_scale-test: outputs differ from the graph before the pass")
    assert info.value.reproducer.startswith("polygraphy run")
    # the internal manager verifies numerically by default too; structure is the explicit opt-out
    from tqc.compiler.pipeline.manager import PassManager as Manager

    with pytest.raises(tqc.VerificationError):
        Manager([ScaleLastWeight()]).run(make_mlp())
    result = tqc.compile(make_mlp(), [Fold(), ScaleLastWeight()], verify="structure")
    assert sorted(result.report["stages"][1]["verify"]) == ["seconds", "structure"]


def test_a_manager_runs_on_many_models_and_keeps_no_state(tmp_path, mlp_data):
    manager = tqc.PassManager([Fold(), Qdq(smooth=0.5)], calib={"x": mlp_data})
    first = saved_bytes(manager(make_mlp(seed=0)), tmp_path / "a.onnx")
    other = saved_bytes(manager(make_mlp(seed=1)), tmp_path / "b.onnx")
    again = saved_bytes(manager(make_mlp(seed=0)), tmp_path / "c.onnx")
    alone = saved_bytes(tqc.compile(make_mlp(seed=1), "fold,qdq{smooth=0.5}", calib={"x": mlp_data}),
                        tmp_path / "d.onnx")
    assert first == again and other == alone and first != other


# ---------------------------------------------------------------- saving: atomic, never over an input

def test_save_never_writes_over_what_the_compile_read(tmp_path, mlp_data):
    onnx.save(make_mlp(), str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    np.savez(tmp_path / "calib.npz", x=mlp_data)
    before = {p.name: digest(p) for p in tmp_path.iterdir()}
    result = tqc.compile(tmp_path / "ext.onnx", "fold,qdq", calib=tmp_path / "calib.npz")
    for target, what in [("ext.onnx", "the input model"), ("ext.onnx.data", "an external-data file of the input model"),
                         ("calib.npz", "--calib")]:
        with pytest.raises(tqc.TqcError) as info:
            result.save(tmp_path / target)
        assert f"is {what}" in str(info.value) and "tqc never writes over a file it reads" in str(info.value)
    assert {p.name: digest(p) for p in tmp_path.iterdir()} == before  # nothing written, nothing left
    with pytest.raises(tqc.TqcError, match=r"m\.bin' must end in \.onnx, \.plan \(TensorRT\) or \.xml"):
        result.save(tmp_path / "m.bin")
    # external data in, the same model as from the object; an object whose data stayed in its file is refused
    assert saved_bytes(result, tmp_path / "out.onnx") == saved_bytes(
        tqc.compile(make_mlp(), "fold,qdq", calib={"x": mlp_data}), tmp_path / "from-object.onnx")
    with pytest.raises(tqc.TqcError, match="tensor 'wa' of the model is stored in external data that was not loaded"):
        tqc.compile(onnx.load(str(tmp_path / "ext.onnx"), load_external_data=False), "fold")


def test_save_writes_external_data_above_the_protobuf_limit(tmp_path, mlp_data, monkeypatch):
    result = tqc.compile(make_mlp(hidden=512), "fold,qdq", calib={"x": mlp_data})  # weights above 1024 elements
    result.save(tmp_path / "inline.onnx")
    import tqc.compiler.io.model as model_io

    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)  # as if the model were above 2 GB
    result.save(tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size > 0 and not (tmp_path / "inline.onnx.data").exists()
    assert (tmp_path / "big.onnx").stat().st_size < (tmp_path / "inline.onnx").stat().st_size
    feed = {"x": mlp_data[:5]}
    np.testing.assert_array_equal(outputs(tmp_path / "big.onnx", feed)[0], outputs(tmp_path / "inline.onnx", feed)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data", "inline.onnx"]


# ---------------------------------------------------------------- export

def test_export_is_tqc_export(tmp_path, capsys):
    pytest.importorskip("torch")
    info = tqc.export("bert-tiny", tmp_path / "api.onnx", seed=3)
    code, _, err = run_cli(["-q", "export", "bert-tiny", "-o", str(tmp_path / "cli.onnx"), "--seed", "3"], capsys)
    assert code == 0, err
    assert digest(tmp_path / "api.onnx") == digest(tmp_path / "cli.onnx")
    assert info["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert info["outputs"] == ["last_hidden_state"]
    feed = {"input_ids": np.array([[1, 5, 9, 2]]), "attention_mask": np.ones((1, 4), np.int64),
            "token_type_ids": np.zeros((1, 4), np.int64)}
    assert outputs(tmp_path / "api.onnx", feed)[0].shape == (1, 4, 64)


def test_export_refuses_what_the_cli_refuses(tmp_path, capsys):
    code, _, err = run_cli(["export", "bert-tiny", "-o", str(tmp_path / "o.onnx"), "--opset", "21"], capsys)
    assert code == 2
    with pytest.raises(tqc.TqcError) as info:
        tqc.export("bert-tiny", tmp_path / "o.onnx", opset=21)
    assert err.strip() == f"tqc: error: {info.value}"
    for settings, message in [(dict(size="huge"), "--size must be one of base, tiny"),
                              (dict(seed=-1), "--seed must be an integer in [0, 4294967295], got -1"),
                              (dict(task="summarize"), "--task must be one of feature-extraction, text-classification, "
                                                       "token-classification, question-answering, fill-mask, "
                                                       "sentence-embedding")]:
        with pytest.raises(tqc.TqcError) as info:
            tqc.export("bert-tiny", tmp_path / "o.onnx", **settings)
        assert str(info.value) == message
    config = tmp_path / "config.json"
    config.write_text("{}")
    with pytest.raises(tqc.TqcError, match="tqc never writes over a file it reads"):
        tqc.export(config, config)
    assert config.read_text() == "{}" and not (tmp_path / "o.onnx").exists()


# ---------------------------------------------------------------- the namespace

def test_import_tqc_is_light_and_names_the_api(tmp_path):
    code = ("import sys, tqc; heavy = sorted(m for m in ('onnxruntime', 'onnx_graphsurgeon', 'torch') "
            "if m in sys.modules); print(heavy, tqc.__version__, sorted(tqc.__all__))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    heavy, version, names = done.stdout.split(" ", 2)
    assert heavy == "[]" and version == tqc.__version__
    for name in ("compile", "diff", "export", "PassManager", "TqcError", "VerificationError"):
        assert name in names and name in dir(tqc)
    assert issubclass(tqc.VerificationError, tqc.TqcError)
    with pytest.raises(AttributeError):
        tqc.no_such_name
    from tqc import passes

    assert {"Fold", "Fuse", "Qdq", "Fp16", "Pass"} <= set(dir(passes))


def test_a_generator_serves_every_run_of_a_manager(mlp_data, tmp_path):
    manager = tqc.PassManager("fold,qdq", calib=({"x": mlp_data[i:i + 8]} for i in range(0, 32, 8)))
    first = saved_bytes(manager(make_mlp()), tmp_path / "a.onnx")
    assert saved_bytes(manager(make_mlp()), tmp_path / "b.onnx") == first
    assert first == saved_bytes(tqc.compile(make_mlp(), "fold,qdq", calib={"x": mlp_data}), tmp_path / "c.onnx")
