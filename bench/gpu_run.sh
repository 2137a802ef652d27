#!/usr/bin/env bash
# Runs a benchmark on the GPU machine (see ../shared/gpu/README.md): installs the carried wheels, makes tqc
# importable without pip (a symlinked package folder), then runs $1 (a .py with python3, else as a command).
set -euo pipefail
[ -d /tmp/site/onnxruntime ] || (cat /tmp/gpu/part.* | tar x -C /tmp/gpu && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/gpu/wheels/*.whl)
root=$(pwd)
mkdir -p /tmp/tqcpath/tqc
for f in "$root"/tqc/*.py; do ln -sf "$f" /tmp/tqcpath/tqc/; done
for sub in passes compiler models; do ln -sfn "$root/$sub" "/tmp/tqcpath/tqc/$sub"; done
export PYTHONPATH=/tmp/site:/tmp/tqcpath PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L || true
python3 -c "import onnxruntime as o, torch, transformers; print('ort', o.__version__, o.get_available_providers(), 'torch', torch.__version__, 'transformers', transformers.__version__)"
case "$1" in
  *.py) script=$1; shift; python3 "$script" "$@" ;;
  *) "$@" ;;
esac
