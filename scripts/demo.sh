#!/usr/bin/env bash
# Set up (idempotent) and run the embedded default: a tiny model, built and pre-trained locally,
# learns a toy task by GRPO with LoRA, syncing into a real vLLM engine after every step.
# Output: runs/demo (metrics.jsonl, report.png, TensorBoard files, checkpoints, summary.json).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lorasync demo --out "${1:-runs/demo}"
