"""``stub_model.py`` run outside Triton, for tests and benchmarks: its own code, with stand-ins for Triton's side.

    load_stub(folder, conf)        copies the stub (or another version of it, ``source``) into ``folder`` beside
                                   ``serve.json``, imports it under a name of its own with ``pb_utils`` below
                                   standing for ``triton_python_backend_utils`` (only during the import; the stub
                                   keeps its reference), and returns the module
    text_request(texts) / Request  a request as the python backend hands it over (TEXT rows of UTF-8,
                                   right-padded with zero bytes; or any named tensors)
    answer(response)               a response's tensors by name, or its error message

What this does not show is Triton itself: the front end, the dynamic batcher and the hand-off to the stub's
process. The server tests (``test_serve.py``) cover those.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types
from itertools import count
from pathlib import Path

import numpy as np

from tqc.compiler.tools.serve.repository import STUB_MODEL, WORDPIECE_WORDS  # the files a repository's model folder gets

_LOADED = count()


class Tensor:
    def __init__(self, name: str, array: np.ndarray):
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class TritonError:
    INVALID_ARG = 3

    def __init__(self, message: str, code: int | None = None):
        self._message, self.code = message, code

    def message(self) -> str:
        return self._message


class InferenceResponse:
    def __init__(self, output_tensors: list, error: TritonError | None = None):
        self.output_tensors, self.error = output_tensors, error


class Request:
    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors = tensors


def get_input_tensor_by_name(request: Request, name: str) -> Tensor | None:
    return Tensor(name, request.tensors[name]) if name in request.tensors else None


def pb_utils() -> types.ModuleType:
    """A module with the names of ``triton_python_backend_utils`` that the stub uses."""
    module = types.ModuleType("triton_python_backend_utils")
    for item in (Tensor, TritonError, InferenceResponse, get_input_tensor_by_name):
        setattr(module, item.__name__, item)
    return module


def text_request(texts: list[str]) -> Request:
    encoded = [t.encode("utf-8") for t in texts]
    data = np.zeros((len(encoded), max(len(e) for e in encoded)), dtype=np.uint8)
    for row, raw in enumerate(encoded):
        data[row, :len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return Request({"TEXT": data})


def answer(response: InferenceResponse) -> dict[str, np.ndarray] | str:
    if response.error is not None:
        return response.error.message()
    return {tensor.name(): tensor.as_numpy() for tensor in response.output_tensors}


def load_stub(folder: Path, conf: dict, source: str | None = None) -> types.ModuleType:
    """The stub module, imported from ``folder`` (written: ``model.py``, ``serve.json`` and the
    ``wordpiece_words.py`` it loads from beside itself); ``source``: the text of another version of the stub (a
    benchmark's before)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "serve.json").write_text(json.dumps(conf))
    shutil.copyfile(WORDPIECE_WORDS, folder / WORDPIECE_WORDS.name)
    path = folder / "model.py"
    path.write_text(source if source is not None else STUB_MODEL.read_text())
    spec = importlib.util.spec_from_file_location(f"tqc_stub_{next(_LOADED)}", path)
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get("triton_python_backend_utils")
    sys.modules["triton_python_backend_utils"] = pb_utils()
    try:
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            sys.modules.pop("triton_python_backend_utils", None)
        else:
            sys.modules["triton_python_backend_utils"] = previous
    return module
