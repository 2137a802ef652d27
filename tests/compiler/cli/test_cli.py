"""Bad input: one readable line on stderr, exit code 2, input untouched, no partial output."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tqc.compiler.cli.main import main


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(list(args))
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if not line.startswith("[")]  # progress lines start with '['


@pytest.mark.parametrize("case", ["missing", "corrupt", "directory", "unwritable", "same", "unknown_pass",
                                  "bad_option", "bad_suffix", "plan_without_trt", "out_dir_missing"])
def test_bad_input_is_one_line_exit_2(case, tmp_path, mlp_path, capsys):
    before = digest(mlp_path)
    out = tmp_path / "out.onnx"
    model = str(mlp_path)
    pipeline = "fold"
    if case == "missing":
        model = str(tmp_path / "nope.onnx")
    elif case == "corrupt":
        bad = tmp_path / "bad.onnx"
        bad.write_bytes(mlp_path.read_bytes()[:100])
        model = str(bad)
    elif case == "directory":
        model = str(tmp_path)
    elif case == "unwritable":
        ro = tmp_path / "ro"
        ro.mkdir()
        os.chmod(ro, 0o500)
        out = ro / "out.onnx"
        if os.access(ro, os.W_OK) and os.geteuid() == 0:
            # root ignores permission bits; a path under /proc is unwritable for everyone
            out = Path("/proc/tqc-out.onnx")
    elif case == "same":
        out = mlp_path
    elif case == "unknown_pass":
        pipeline = "fodl"
    elif case == "bad_option":
        pipeline = "fold{bins=3}"
    elif case == "bad_suffix":
        out = tmp_path / "out.txt"
    elif case == "plan_without_trt":
        try:
            import tensorrt  # noqa: F401
            pytest.skip("TensorRT is importable here")
        except ImportError:
            pass
        out = tmp_path / "out.plan"
    elif case == "out_dir_missing":
        out = tmp_path / "missing" / "out.onnx"
    code, stdout, err = run_cli(["-q", "compile", model, "-p", pipeline, "-o", str(out)], capsys)
    lines = error_lines(err)
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("tqc: error: "), err
    assert "Traceback" not in err
    assert digest(mlp_path) == before
    assert not out.exists() or out == mlp_path
    assert [p for p in tmp_path.rglob("*") if p.name.startswith(".")] == []  # no temp files left


def test_unknown_pass_suggests(mlp_path, tmp_path, capsys):
    code, _, err = run_cli(["compile", str(mlp_path), "-p", "fold,fodl", "-o", str(tmp_path / "o.onnx")], capsys)
    assert code == 2
    assert "unknown pass 'fodl' (did you mean 'fold'?)" in err


def test_debug_shows_traceback(mlp_path, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tqc", "--debug", "compile", str(mlp_path), "-p", "fodl",
                           "-o", str(tmp_path / "o.onnx")], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr


def test_python_m_tqc_and_console_script(mlp_path, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tqc", "passes"], capture_output=True, text=True)
    assert proc.returncode == 0 and "fold" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "tqc", "-q", "compile", str(mlp_path), "-p", "nope", "-o",
                           str(tmp_path / "o.onnx")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("tqc: error: unknown pass 'nope'")


def test_compile_writes_output_and_report(mlp_path, tmp_path, capsys):
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    code, stdout, _ = run_cli(["-q", "compile", str(mlp_path), "-p", "fold", "-o", str(out), "--verify", "numeric",
                               "--report", str(report), "--target", "ort-cpu"], capsys)
    assert code == 0
    data = json.loads(report.read_text())
    assert data["target"] == "ort-cpu"
    assert data["input"]["hash"].startswith("sha256:")
    assert data["stages"][0]["verify"]["numeric"]["passed"] is True
    assert "exact" in stdout


def test_inspect_json(mlp_path, capsys):
    code, stdout, _ = run_cli(["inspect", str(mlp_path), "--json"], capsys)
    assert code == 0
    info = json.loads(stdout)
    assert info["opsets"] == {"ai.onnx": 17}
    assert info["ops"]["ai.onnx::MatMul"] == 2
    assert info["inputs"] == [{"name": "x", "dtype": "float", "shape": ["batch", 4]}]
    assert info["parameters"] == 4 * 8 * 2 + 8 + 8 * 3
    assert info["qdq"] == {"QuantizeLinear": 0, "DequantizeLinear": 0}


def test_inspect_text(mlp_path, capsys):
    code, stdout, _ = run_cli(["inspect", str(mlp_path)], capsys)
    assert code == 0 and "ai.onnx::MatMul" in stdout and "parameters: 96" in stdout


def test_passes_lists_summaries(capsys):
    code, stdout, _ = run_cli(["passes"], capsys)
    assert code == 0 and stdout.startswith("fold")


def test_missing_required_option_is_one_line(mlp_path, capsys):
    code, _, err = run_cli(["compile", str(mlp_path), "-o", "x.onnx"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--pipeline" in err
