"""`resolve_model` (`models/resolve.py`): a folder is taken as it is, a `get-model` name is sent
to `lorasync get-model`, a hub name is downloaded, and without the hub (or for anything else)
the error names every way to get a folder; the CLI's commands resolve their model through it."""

import pytest

from lorasync.commands.cli import main
from lorasync.models.resolve import resolve_model
from tests.models.test_convert import NAME


def unreachable_hub(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError("cannot reach the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)


def test_resolve_model_takes_folders_as_they_are(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)


def test_resolve_model_sends_registry_names_to_get_model():
    with pytest.raises(FileNotFoundError, match=f"run `lorasync get-model {NAME} --out DIR` once"):
        resolve_model(NAME)


def test_resolve_model_without_the_hub_says_how_to_get_a_folder(monkeypatch):
    unreachable_hub(monkeypatch)
    with pytest.raises(FileNotFoundError) as known:
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert f"lorasync get-model {NAME} --out DIR" in str(known.value)
    assert "hf download HuggingFaceTB/SmolLM2-135M-Instruct --local-dir DIR" in str(known.value)
    with pytest.raises(FileNotFoundError) as other:
        resolve_model("Org/Other-1B")
    assert "get-model" not in str(other.value) and "hf download Org/Other-1B" in str(other.value)


def test_resolve_model_downloads_hub_names(monkeypatch, tmp_path):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: asked.append((repo_id, kw)) or str(tmp_path))
    assert resolve_model("Org/Name") == str(tmp_path)
    assert asked[0][0] == "Org/Name" and "*.safetensors" in asked[0][1]["allow_patterns"]


def test_resolve_model_names_every_way_for_anything_else():
    with pytest.raises(FileNotFoundError, match="pass a model folder, a Hugging Face hub name"):
        resolve_model("./no/such/folder")


def test_cli_commands_resolve_their_model(monkeypatch, tmp_path, capsys):
    unreachable_hub(monkeypatch)
    assert main(["sync-check", "--base", NAME, "--adapter", str(tmp_path)]) == 2
    assert f"lorasync get-model {NAME}" in capsys.readouterr().err
    assert main(["eval", "--model", "Org/Other-1B"]) == 2
    assert "hf download Org/Other-1B" in capsys.readouterr().err
    assert main(["make-adapter", "--base", NAME, "--out", str(tmp_path / "a")]) == 2
    assert main(["serve", "--model", NAME]) == 2
