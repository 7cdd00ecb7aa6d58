"""setup.cfg's dependency floors are versions the tests actually run on (issue 20 item 8)."""

from __future__ import annotations

import configparser
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _requirements(section: str, key: str) -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg[section][key].strip().splitlines()
    return [Requirement(ln.strip()) for ln in lines if ln.strip() and not ln.startswith("#")]


def _floor(req: Requirement) -> Version:
    floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
    assert len(floors) == 1, f"{req}: one >= floor expected"
    return floors[0]


@pytest.mark.parametrize("req", _requirements("options", "install_requires"), ids=lambda r: r.name)
def test_installed_versions_meet_the_floors(req):
    """The suite runs on what is installed: it must be a version setup.cfg allows."""
    installed = Version(version(req.name))
    assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed}"
    assert _floor(req) <= installed


def test_extras_floors_hold_for_what_is_installed():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    for extra, text in cfg["options.extras_require"].items():
        for line in text.strip().splitlines():
            req = Requirement(line.strip())
            try:
                installed = Version(version(req.name))
            except PackageNotFoundError:
                continue  # an extra this environment did not install
            assert req.specifier.contains(installed, prereleases=True), (extra, str(req))


def test_ci_installs_the_torch_the_floors_name():
    """.ci/run installs torch/torchvision before the package: the same floors as setup.cfg."""
    run = (ROOT / ".ci" / "run").read_text()
    reqs = {r.name: r for r in _requirements("options", "install_requires")}
    for name in ("torch", "torchvision"):
        pinned = re.search(rf'"{name}>=([0-9.]+)"', run)
        assert pinned, f".ci/run does not install {name}>=..."
        assert Version(pinned.group(1)) == _floor(reqs[name]), name


def test_the_torch_floor_has_what_the_code_uses():
    import torch

    assert hasattr(torch.serialization, "safe_globals")  # md_plugin/checkpoint.py
