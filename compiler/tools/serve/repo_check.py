"""``tqc check-triton REPO``: a ``tqc export-triton`` repository, loaded as far as this machine can.

The tritonserver here (nvidia-pytriton's) has the python backend only, so an ``onnxruntime_onnx`` or
``tensorrt_plan`` model cannot run in it. What can be checked, is:

    config.pbtxt  -> parsed and validated by tritonserver itself (explicit model control, --load-model each):
                     a model whose only failure is the missing onnxruntime/tensorrt backend has a config that
                     Triton accepts; any other reason is the config's fault and is reported
    1/model.onnx  -> loaded by ONNX Runtime CPU from the repository's copy (so weights in external data files
                     must be there), and its inputs/outputs compared with the config's names, types and dims
    1/model.plan  -> not loadable here (no TensorRT); reported as such
    ensemble      -> its wiring against the repository's configs (``triton_text.check_ensemble``): steps name
                     models that are there, tensors meet with the same type and compatible dims
    python model  -> its model.py is there; a tokenizer.json beside it loads with ``tokenizers``
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

from tqc.compiler.core.errors import TqcError
from tqc.compiler.tools.serve.server import free_port
from tqc.compiler.tools.serve.triton_dist import find_triton
from tqc.compiler.tools.triton import parse_pbtxt
from tqc.compiler.tools.triton_text import check_ensemble

MISSING_BACKEND = re.compile(r"unable to find backend library for backend '(\w+)'")
ORT_TO_TRITON = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(int64)": "TYPE_INT64",
                 "tensor(int32)": "TYPE_INT32", "tensor(int8)": "TYPE_INT8", "tensor(uint8)": "TYPE_UINT8",
                 "tensor(bool)": "TYPE_BOOL", "tensor(double)": "TYPE_FP64", "tensor(bfloat16)": "TYPE_BF16"}


def _triton_verdicts(repo: Path, names: list[str], timeout: float) -> dict[str, str]:
    """{model: 'ok' | reason} from tritonserver's own loading of each config."""
    dist = find_triton()
    with tempfile.TemporaryDirectory(prefix="tqc-check-triton-") as backends:
        command = [str(dist.server), f"--model-repository={repo}", f"--backend-directory={backends}",
                   "--model-control-mode=explicit", "--exit-on-error=true", "--allow-metrics=false",
                   "--http-address=127.0.0.1", f"--http-port={free_port()}", "--grpc-address=127.0.0.1",
                   f"--grpc-port={free_port()}", "--log-verbose=0"] + [f"--load-model={n}" for n in names]
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=dist.env(),
                                 stdin=subprocess.DEVNULL)
            log = run.stdout + run.stderr
        except subprocess.TimeoutExpired as exc:  # every model loaded (not possible here) and it kept serving
            log = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    verdicts = {}
    for name in names:
        match = (re.search(rf"failed to load '{re.escape(name)}' version \d+: (.*)", log)
                 or re.search(rf"Poll failed for model directory '{re.escape(name)}': (.*)", log)
                 or re.search(rf"load failed for model '{re.escape(name)}': (.*?);?$", log, re.M))
        if match is None:
            verdicts[name] = "ok" if f"successfully loaded '{name}'" in log else "no verdict in the server's log"
            continue
        reason = match.group(1).strip().strip('"')
        missing = MISSING_BACKEND.search(reason)
        if missing and re.match(rf"ensemble '{re.escape(name)}' depends on ", reason):  # wiring checked at poll
            verdicts[name] = (f"ok (config accepted; its steps need the {missing.group(1)} backend, which is not "
                              "in this server)")
        else:
            verdicts[name] = (f"ok (config accepted; the {missing.group(1)} backend is not in this server)"
                              if missing else reason[:300])
    return verdicts


def _python_model(folder: Path) -> str:
    """A python-backend step of ``export-triton --text``: its model.py, and its tokenizer.json loaded by tokenizers."""
    if not (folder / "model.py").is_file():
        return f"'{folder.name}/model.py' is missing"
    if (folder / "tokenizer.json").is_file():
        try:
            from tokenizers import Tokenizer

            Tokenizer.from_file(str(folder / "tokenizer.json"))
        except ImportError:
            return "ok (model.py present; tokenizers is not installed here to load tokenizer.json)"
        except Exception as exc:  # tokenizers raises its own exception type for a malformed file
            return f"'{folder.name}/tokenizer.json' does not load: {str(exc).splitlines()[0][:200]}"
        return "ok (model.py present; tokenizer.json loaded by tokenizers)"
    return "ok (model.py present)"


def _signature(model_dir: Path, config: dict, configs: dict[str, dict]) -> str:
    versions = sorted(p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        return "no version folder"
    folder = versions[-1]
    if config.get("platform") == "ensemble":
        problems = check_ensemble(config, configs)
        return "ok (every step names a model here; tensors, types and dims agree)" if not problems else \
            "; ".join(problems)
    if config.get("backend") == "python":
        return _python_model(folder)
    if (folder / "model.plan").exists():
        return "not loadable here (TensorRT plan; no TensorRT on this machine)"
    path = folder / "model.onnx"
    if not path.exists():
        return f"'{folder.name}/model.onnx' is missing"
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's load errors: missing external data, unknown ops, ...
        return f"ONNX Runtime cannot load '{folder.name}/model.onnx': {str(exc).strip().splitlines()[0][:300]}"
    batch = int(config.get("max_batch_size", 0)) > 0
    problems = []
    for kind, metas in (("input", session.get_inputs()), ("output", session.get_outputs())):
        declared = {p["name"]: p for p in config.get(kind, [])}
        actual = {m.name: m for m in metas}
        if set(declared) != set(actual):
            problems.append(f"{kind}s {sorted(declared)} in the config, {sorted(actual)} in the model")
            continue
        for name, meta in actual.items():
            dims = [d if isinstance(d, int) and d > 0 else -1 for d in meta.shape]
            dims = dims[1:] if batch else dims
            want = declared[name]
            if ORT_TO_TRITON.get(meta.type) != want.get("data_type"):
                problems.append(f"'{name}' is {meta.type} in the model, {want.get('data_type')} in the config")
            if [int(d) for d in want.get("dims", [])] != dims:
                problems.append(f"'{name}' has dims {dims} in the model (batch axis left out), "
                                f"{want.get('dims')} in the config")
    return "ok (loaded by ONNX Runtime; inputs and outputs match the config)" if not problems else "; ".join(problems)


def check_triton_repository(repo: str | Path, timeout: float = 120.0) -> list[dict]:
    repo = Path(repo).resolve()
    if not repo.is_dir():
        raise TqcError(f"repository '{repo}' does not exist or is not a folder")
    models = sorted(p for p in repo.iterdir() if (p / "config.pbtxt").is_file())
    if not models:
        raise TqcError(f"'{repo}' holds no model folder with a config.pbtxt")
    verdicts = _triton_verdicts(repo, [m.name for m in models], timeout)
    configs: dict[str, dict] = {}
    for model in models:
        try:
            configs[model.name] = dict(parse_pbtxt((model / "config.pbtxt").read_text()), name=model.name)
        except (IndexError, KeyError, ValueError):
            pass
    rows = []
    for model in models:
        try:
            files = _signature(model, configs[model.name], configs)
        except (IndexError, KeyError, ValueError, TypeError, AttributeError) as exc:
            files = f"config.pbtxt could not be read by tqc's parser or checks ({type(exc).__name__})"
        rows.append({"model": model.name, "triton": verdicts[model.name], "files": files,
                     "ok": verdicts[model.name].startswith("ok") and (files.startswith("ok") or "not loadable" in files)})
    return rows
