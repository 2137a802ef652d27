"""``tqc serve``: a compiled model behind a real Triton Inference Server (python backend, ONNX Runtime inside).

    triton_dist.py   where tritonserver, its python backend and the stub come from (the nvidia-pytriton wheel)
    repository.py    the python-backend model repository: a raw-tensor model and a text model per ONNX file
    stub_model.py    the model.py Triton runs (ONNX Runtime, tokenizer, pooling, request checks)
    wordpiece_words.py  printable ASCII to WordPiece ids from a word cache, beside the stub (and the tokenizer step
                     of export-triton --text) in the repository
    server.py        start, readiness, load failures, clean stop
    cli.py           `tqc serve` in the foreground (SIGTERM/SIGINT stop it)
    repo_check.py    `tqc check-triton`: export-triton repositories loaded as far as this machine can
"""
