"""The Triton python-backend ``model.py`` of ``tqc export-triton --text``: text in, the model's token tensors out.

It is the first step of the ``NAME_text`` ensemble and runs in a stock Triton container's python backend, so it
imports nothing from tqc: numpy (in the container) and ``tokenizers`` (``pip install tokenizers`` in the
container, or a folder named by TQC_SERVE_STUB_PATH in the server's environment, put first on ``sys.path``).

    requests TEXT  BYTES [n, 1]  (UTF-8, one text per row); the texts of all requests of an execute call are
             tokenized in one call
    response the model's token inputs (input_ids, attention_mask, token_type_ids: the ones it has), INT64 [n, seq],
             padded to the longest text of the request; answers of a request never depend on another request

Settings come from config.pbtxt ``parameters``: ``max_length`` (token limit), ``pad_id``, ``long_text``
(``truncate``: sentence-transformers' behaviour, ``error``: the request is refused), ``outputs`` (comma-separated)
and ``max_text_bytes``. A request that fails its checks gets an error response of its own. Texts of printable ASCII
go through ``wordpiece_words.py`` (beside this file) where the tokenizer is a BERT WordPiece one it reproduces
(checked at load): the tokenizer's own ids, word by word from a cache, without building its Encoding objects.
"""

import importlib.util
import json
import os
import site
import sys

for _folder in reversed([p for p in os.environ.get("TQC_SERVE_STUB_PATH", "").split(os.pathsep) if p]):
    site.addsitedir(_folder)  # its .pth files too
    sys.path[:] = [_folder] + [p for p in sys.path if p != _folder]

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

_spec = importlib.util.spec_from_file_location("_tqc_wordpiece_words",
                                               os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                            "wordpiece_words.py"))
_words = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_words)


class RequestError(ValueError):
    """What was wrong with one request; sent back as its error response."""


class TritonPythonModel:
    def initialize(self, args):
        from tokenizers import Tokenizer

        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.max_length = int(params["max_length"])
        self.pad_id = int(params["pad_id"])
        self.long_text = params.get("long_text", "truncate")
        self.max_text_bytes = int(params.get("max_text_bytes", "65536"))
        self.outputs = params["outputs"].split(",")
        self.tokenizer = Tokenizer.from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                          "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        self.words = _words.WordPieceWords.for_tokenizer(self.tokenizer, self.max_length)

    def _texts(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, "TEXT")
        if tensor is None:
            raise RequestError("input 'TEXT' is missing")
        texts = []
        for item in tensor.as_numpy().reshape(-1):
            raw = item if isinstance(item, bytes) else str(item).encode("utf-8")
            if len(raw) > self.max_text_bytes:
                raise RequestError(f"a text of {len(raw)} bytes exceeds the limit of {self.max_text_bytes} bytes")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RequestError(f"TEXT is not valid UTF-8 (byte {exc.start})") from None
            if not text.strip():
                raise RequestError("TEXT is empty")
            texts.append(text)
        if not texts:
            raise RequestError("TEXT holds no text")
        return texts

    def _tokens(self, encodings):
        if self.long_text == "error" and any(e.overflowing for e in encodings):
            raise RequestError(f"TEXT is longer than the model's limit of {self.max_length} tokens")
        seq = max(len(e.ids) for e in encodings)
        values = {"input_ids": np.full((len(encodings), seq), self.pad_id, dtype=np.int64),
                  "attention_mask": np.zeros((len(encodings), seq), dtype=np.int64),
                  "token_type_ids": np.zeros((len(encodings), seq), dtype=np.int64)}
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            values["input_ids"][row, :n] = encoding.ids
            values["attention_mask"][row, :n] = 1
            values["token_type_ids"][row, :n] = encoding.type_ids
        return [pb_utils.Tensor(name, values[name]) for name in self.outputs]

    def _encode(self, texts):
        """Printable ASCII texts word by word (``wordpiece_words``) where it applies; else one text by encode()
        (encode_batch's thread pool costs more than it saves there), several by encode_batch."""
        if self.words is not None and all(text.isascii() and text.isprintable() for text in texts):
            encodings = [self.words.encode(text) for text in texts]
            if not any(encoding is None for encoding in encodings):
                return encodings
        return [self.tokenizer.encode(texts[0])] if len(texts) == 1 else self.tokenizer.encode_batch(texts)

    def execute(self, requests):
        """The texts of every request in one tokenizer call (its threads), then each request padded on its own."""
        responses = [None] * len(requests)
        owners, texts = [], []
        for index, request in enumerate(requests):
            try:
                mine = self._texts(request)
            except RequestError as exc:
                responses[index] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc)))
                continue
            owners.append((index, len(texts), len(mine)))
            texts.extend(mine)
        if texts:
            encodings = self._encode(texts)
            for index, start, count in owners:
                try:
                    tensors = self._tokens(encodings[start:start + count])
                    responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
                except RequestError as exc:
                    responses[index] = pb_utils.InferenceResponse(output_tensors=[],
                                                                  error=pb_utils.TritonError(str(exc)))
        return responses
