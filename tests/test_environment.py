"""The environment is described in two places (pip and conda/Binder); they must agree."""

from __future__ import annotations

import importlib.metadata as md
import re
import tomllib

import pytest
import yaml

from course_lib import ROOT


def _pins(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)", line)
        assert m, f"not an exact pin: {line!r}"
        pins[m.group(1).lower()] = m.group(2)
    return pins


def requirements() -> dict[str, str]:
    return _pins((ROOT / "requirements.txt").read_text().splitlines())


def conda_pip_section() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1, "environment.yml needs exactly one pip section"
    return _pins(pip_lists[0])


def test_environment_yml_matches_requirements() -> None:
    req, conda = requirements(), conda_pip_section()
    missing = sorted(set(req) - set(conda))
    extra = sorted(set(conda) - set(req))
    differ = sorted(k for k in set(req) & set(conda) if req[k] != conda[k])
    assert not (missing or extra or differ), (
        f"environment.yml drifted from requirements.txt: missing {missing}, extra {extra}, "
        f"different pins {[(k, req[k], conda[k]) for k in differ]}"
    )


def test_environment_yml_python_version_matches_pyproject() -> None:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pythons = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python")]
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    low = re.match(r">=(\d+\.\d+)", requires)
    assert low and pythons == [f"python={low[1]}"], f"environment.yml {pythons}, pyproject {requires!r}"


@pytest.mark.parametrize("name", ["torch", "torchvision", "numpy", "nbgrader", "nbval", "jupyterlab"])
def test_installed_versions_are_the_pinned_ones(name: str) -> None:
    """The environment the tests run in is the pinned one (catches a stale .venv)."""
    installed = md.version(name).split("+")[0]
    assert installed == requirements()[name], f"{name} {installed} installed, {requirements()[name]} pinned"


def test_torch_and_torchvision_are_the_matching_pair() -> None:
    """torchvision's compiled operators load against this torch (a mismatched pair fails here)."""
    import torch
    import torchvision

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
