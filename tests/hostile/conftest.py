"""Fixtures shared by the hostile-input modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hostile.models import make_token_model


@pytest.fixture(scope="module")
def text_world(tmp_path_factory) -> Path:
    """A token model with MiniLM's vocabulary size but only 16 positions (``tok30k.onnx``), and long
    sentences (``long.txt``)."""
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("text")
    make_token_model(folder / "tok30k.onnx", vocab=30522)
    sentence = " ".join(["the quick brown fox jumps over the lazy dog"] * 6)
    (folder / "long.txt").write_text("\n".join([sentence] * 8) + "\n")
    return folder
