#!/usr/bin/env bash
# Set up (idempotent), build a tiny model and a random LoRA adapter locally, and check that a
# sync into a real vLLM engine serves the trainer's policy (logprob parity). Output: runs/quickstart.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-runs/quickstart}
lorasync=.venv/bin/lorasync
$lorasync make-tiny --arch qwen2 --out "$out/base"
$lorasync make-adapter --base "$out/base" --out "$out/adapter" --rank 8 --adapter-name policy
$lorasync sync-check --base "$out/base" --adapter "$out/adapter" --repeat 5
