#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, real vLLM tests included.
# pytest exits 5 when it collects no tests, so a run that tests nothing fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING}
exec .venv/bin/python -m pytest "$@"
