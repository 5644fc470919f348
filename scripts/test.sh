#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, real vLLM tests included, as three pytest
# runs, each test in exactly one (markers: pyproject.toml), stopping at the first that fails:
#   1. the fast tier: no vLLM, no spawned ranks or `lorasync` processes, no clock asserts (< 1 min);
#   2. the rest but the timing tests: vLLM engines and servers, ranks, CLI processes;
#   3. the timing tests (they assert on wall-clock time), alone: nothing else loads the cores.
# With arguments: one pytest run with them (e.g. a tier's -m, or a file).
# pytest exits 5 when it collects no tests, so a run that tests nothing fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING}
pytest=(.venv/bin/python -m pytest)
if [ $# -gt 0 ]; then
    exec "${pytest[@]}" "$@"
fi
"${pytest[@]}" -m "not vllm and not distributed and not slow and not timing"
"${pytest[@]}" -m "(vllm or distributed or slow) and not timing"
"${pytest[@]}" -m "timing"
