"""``tqc export-triton --text``: the model behind Triton's onnxruntime backend, with text in through an ensemble.

    repo/
      NAME/              platform onnxruntime_onnx: the model (tools/triton.py's folder, unchanged)
      NAME_tokenizer/    backend python: TEXT (BYTES, one UTF-8 text per row) -> the model's token inputs (INT64)
        config.pbtxt       parameters: max_length, pad_id, long_text, outputs, max_text_bytes
        1/model.py         tools/triton_tokenizer_model.py (numpy and ``tokenizers`` only)
        1/wordpiece_words.py  tools/serve/wordpiece_words.py (its fast path for WordPiece tokenizers)
        1/tokenizer.json   the model's tokenizer in the fast tokenizer's format
      NAME_text/         platform ensemble: TEXT -> NAME_tokenizer -> NAME -> the model's outputs, same names
        config.pbtxt
        1/                 (empty: Triton wants a version folder for an ensemble too)

The three are for a stock Triton container (nvcr.io/nvidia/tritonserver:<yy.mm>-py3, with ``tokenizers``
installed for its python backend); no such container runs on the project's machines, and the tritonserver here
has no onnxruntime backend, so what is verified, and how, is listed in docs/scale-out.md.

The ensemble answers what the model answers: sentence embeddings when the model pools in the graph
(``tqc compile -p ...,pool``), token states otherwise (padded to the longest text of the request, returned with
the tokenizer's attention_mask; a note says so). ``check_ensemble`` verifies the wiring (every step names a
model of the repository, every tensor it maps exists with the same type and compatible dims, every output is
produced) on the configs before anything is written, and in ``tqc check-triton``.
"""

from __future__ import annotations

from pathlib import Path

from tqc.compiler.core.errors import TqcError
from tqc.compiler.tools.serve.repository import (TOKEN_INPUTS, WORDPIECE_WORDS, model_facts, save_tokenizer,
                                                 sentence_encoder, tokenizer_folder)
from tqc.compiler.tools.triton import check_options, model_config, model_folder, stage_folder

TOKENIZER_MODEL = Path(__file__).with_name("triton_tokenizer_model.py")
MAX_TEXT_BYTES = 65536


def _param(key: str, value) -> dict:
    return {"key": key, "value": {"string_value": str(value)}}


def tokenizer_config(name: str, names: list[str], max_batch: int, instances: int, queue_delay_us: int,
                     settings: dict) -> dict:
    """The python-backend tokenizer: TEXT [texts] -> each token input INT64 [texts, sequence]."""
    text = [{"name": "TEXT", "data_type": "TYPE_STRING", "dims": [-1, 1] if max_batch > 0 else [-1]}]
    tokens = [{"name": n, "data_type": "TYPE_INT64", "dims": [-1, -1]} for n in names]
    config = model_config(name, None, text, tokens, max_batch, instances, "KIND_CPU", queue_delay_us)
    del config["platform"]
    config["backend"] = "python"
    config["parameters"] = [_param(key, settings[key]) for key in ("max_length", "pad_id", "long_text")] + [
        _param("outputs", ",".join(names)), _param("max_text_bytes", MAX_TEXT_BYTES)]
    return config


def per_token(model: dict) -> bool:
    """Whether an output of the model has a sequence axis (token states, not one row per text)."""
    batch_axis = 0 if model["max_batch_size"] > 0 else 1
    return any(len(p["dims"]) - batch_axis >= 2 for p in model["output"])


def ensemble_config(name: str, tokenizer: dict, model: dict) -> dict:
    """TEXT -> tokenizer -> model; the ensemble's outputs are the model's (names, types, dims), plus the
    tokenizer's attention_mask when the model answers per token (it says which positions are padding)."""
    def identity(names):
        return [{"key": n, "value": n} for n in names]

    outputs = [dict(p) for p in model["output"]]
    if per_token(model) and "attention_mask" not in [p["name"] for p in outputs]:
        outputs += [dict(p) for p in tokenizer["output"] if p["name"] == "attention_mask"]
    return {"name": name, "platform": "ensemble", "max_batch_size": model["max_batch_size"],
            "input": [dict(p) for p in tokenizer["input"]], "output": outputs,
            "ensemble_scheduling": {"step": [
                {"model_name": tokenizer["name"], "model_version": -1, "input_map": identity(["TEXT"]),
                 "output_map": identity([p["name"] for p in tokenizer["output"]])},
                {"model_name": model["name"], "model_version": -1,
                 "input_map": identity([p["name"] for p in model["input"]]),
                 "output_map": identity([p["name"] for p in model["output"]])}]}}


def _dims_agree(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b))


def _as_list(value) -> list:
    return value if isinstance(value, list) else [] if value is None else [value]


def check_ensemble(ensemble: dict, configs: dict[str, dict]) -> list[str]:
    """What is wrong with an ensemble's wiring against the configs of its repository ([] when nothing is)."""
    problems = []
    known = {p["name"]: p for p in _as_list(ensemble.get("input"))}
    steps = _as_list(ensemble.get("ensemble_scheduling", {}).get("step"))
    if not steps:
        return ["the ensemble has no step"]
    pending = list(enumerate(steps, 1))
    while pending:
        ready = [(i, s) for i, s in pending
                 if all(m.get("value") in known for m in _as_list(s.get("input_map")))]
        if not ready:
            for i, step in pending:
                missing = [m.get("value") for m in _as_list(step.get("input_map")) if m.get("value") not in known]
                problems.append(f"step {i} ({step.get('model_name')}) reads {missing}, which no input or step gives")
            break
        for i, step in ready:
            pending.remove((i, step))
            model = configs.get(step.get("model_name"))
            if model is None:
                problems.append(f"step {i} names model '{step.get('model_name')}', which the repository lacks")
                continue
            where = f"step {i} ({model['name']})"
            if int(ensemble.get("max_batch_size", 0)) > int(model.get("max_batch_size", 0)):
                problems.append(f"{where}: max_batch_size {model.get('max_batch_size', 0)} is below the "
                                f"ensemble's {ensemble.get('max_batch_size')}")
            ports = {p["name"]: p for p in _as_list(model.get("input"))}
            mapped = {m.get("key"): m.get("value") for m in _as_list(step.get("input_map"))}
            for port in ports:
                if port not in mapped:
                    problems.append(f"{where}: input '{port}' is not mapped")
            for port, tensor in mapped.items():
                if port not in ports:
                    problems.append(f"{where}: maps '{tensor}' to '{port}', which is not an input of the model")
                    continue
                have, want = known[tensor], ports[port]
                if have.get("data_type") != want.get("data_type") or not _dims_agree(
                        _as_list(have.get("dims")), _as_list(want.get("dims"))):
                    problems.append(f"{where}: '{tensor}' is {have.get('data_type')} {have.get('dims')}, input "
                                    f"'{port}' wants {want.get('data_type')} {want.get('dims')}")
            outputs = {p["name"]: p for p in _as_list(model.get("output"))}
            for mapping in _as_list(step.get("output_map")):
                if mapping.get("key") not in outputs:
                    problems.append(f"{where}: output '{mapping.get('key')}' is not an output of the model")
                    continue
                known[mapping.get("value")] = dict(outputs[mapping["key"]], name=mapping.get("value"))
    for port in _as_list(ensemble.get("output")):
        have = known.get(port["name"])
        if have is None:
            problems.append(f"ensemble output '{port['name']}' is produced by no step")
        elif have.get("data_type") != port.get("data_type") or not _dims_agree(
                _as_list(have.get("dims")), _as_list(port.get("dims"))):
            problems.append(f"ensemble output '{port['name']}' is declared {port.get('data_type')} "
                            f"{port.get('dims')}, produced as {have.get('data_type')} {have.get('dims')}")
    return problems


def token_inputs(config: dict) -> list[str]:
    """The model's inputs, which must all be token tensors (INT64 [batch, sequence]) and hold input_ids."""
    names = [p["name"] for p in config["input"]]
    for port in config["input"]:
        rank = len(port["dims"]) + (1 if config["max_batch_size"] > 0 else 0)
        if port["name"] not in TOKEN_INPUTS or port["data_type"] != "TYPE_INT64" or rank != 2:
            raise TqcError(f"--text needs a token model (INT64 input_ids / attention_mask / token_type_ids "
                           f"[batch, sequence]); input '{port['name']}' is not one")
    if "input_ids" not in names:
        raise TqcError("--text needs a model with an 'input_ids' input")
    return names


def export_triton_text(model_path: str | Path, repo: str | Path, name: str | None = None, max_batch: int = 32,
                       instances: int = 1, kind: str = "KIND_GPU", queue_delay_us: int = 100,
                       tokenizer: str | None = None, max_length: int | None = None, long_text: str = "truncate",
                       note=None) -> dict:
    """Write NAME/, NAME_tokenizer/ and NAME_text/ into ``repo``, all three or none."""
    from tqc.compiler.io import output_guard

    check_options(max_batch, instances, kind, queue_delay_us, 1)
    if long_text not in ("truncate", "error"):
        raise TqcError(f"--long-text must be truncate or error, got '{long_text}'")
    if max_length is not None and not (isinstance(max_length, int) and 1 <= max_length <= 8192):
        raise TqcError(f"--max-length must be an integer in [1, 8192], got {max_length!r}")
    if Path(model_path).suffix == ".plan":
        raise TqcError("--text needs the ONNX model (its tokenizer and limits are read from it); give the .onnx")
    with output_guard.command("export-triton") as guard:
        repo = Path(repo)
        final, model, files = model_folder(guard, model_path, repo, name, max_batch, instances, kind,
                                           queue_delay_us)
        names = token_inputs(model)
        tok_final = guard.writes_folder(repo / f"{model['name']}_tokenizer", "the Triton tokenizer folder")
        text_final = guard.writes_folder(repo / f"{model['name']}_text", "the Triton ensemble folder")
        folder = tokenizer_folder(tokenizer, Path(model_path))
        if folder is None:
            raise TqcError("--text needs the model's tokenizer: give --tokenizer DIR (the export metadata names none)")
        guard.reads_folder(folder, "the tokenizer")
        scratch = guard.temp_dir()
        facts = save_tokenizer(folder, scratch / "tokenizer.json")
        positions = model_facts(Path(model_path)).max_positions
        if max_length and positions and max_length > positions:
            raise TqcError(f"--max-length {max_length} exceeds the model's {positions} positions")
        limit = max_length or sentence_encoder(folder).get("max_length") or facts["model_max_length"] or 512
        limit = min(limit, positions or limit)  # a default never exceeds what the model can take
        settings = {"max_length": limit, "pad_id": facts["pad_id"], "long_text": long_text}
        produced = names + (["attention_mask"] if per_token(model) and "attention_mask" not in names else [])
        tok = tokenizer_config(tok_final.name, produced, max_batch, instances, queue_delay_us, settings)
        text = ensemble_config(text_final.name, tok, model)
        problems = check_ensemble(text, {model["name"]: model, tok["name"]: tok})
        if problems:
            raise RuntimeError(f"the ensemble tqc wrote is miswired: {problems[0]}")
        folders = [(final, model, files),
                   (tok_final, tok, [(TOKENIZER_MODEL, "model.py"), (WORDPIECE_WORDS, WORDPIECE_WORDS.name),
                                    (scratch / "tokenizer.json", "tokenizer.json")]),
                   (text_final, text, [])]
        for folder_path, config, folder_files in folders:
            stage_folder(guard, folder_path, config, folder_files)
    if note and per_token(model):
        note(f"the model answers per token: {text['name']} returns its states padded to the longest text of a "
             "request, with the attention_mask that marks real tokens; compile with the pool pass for sentence "
             "embeddings")
    return {"repository": str(repo), "models": [str(f) for f, _, _ in folders], "config": model,
            "settings": settings}
