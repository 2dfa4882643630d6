"""The code base stays ruff-clean (lint and format) and README's layout table names what the tree holds,
so style and map drift fail the suite like a bug."""

import re
import shutil
import subprocess

import pytest
from conftest import REPO


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is part of the test extra")
@pytest.mark.parametrize("command", [["ruff", "check"], ["ruff", "format", "--check"]])
def test_ruff(command):
    proc = subprocess.run([*command, "loki_dist", "tests", "bench"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_readme_layout_names_every_module_where_it_is():
    """Each `loki_dist/...` row of README's layout table names exactly the modules of that folder (a
    module added, moved or removed without the table is a newcomer sent to the wrong room)."""
    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    rows = dict(re.findall(r"^\| `(loki_dist/[a-z_/.]*)` \| (.*) \|$", layout, re.M))
    package = REPO / "loki_dist"
    folders = sorted(p.parent for p in package.rglob("__init__.py"))  # stage folders and their rooms
    tree = {f"loki_dist/{p.relative_to(package)}/".replace("/./", "/"): p for p in folders}
    for name, folder in tree.items():
        modules = {p.name for p in folder.glob("*.py")} - {"__init__.py", "__main__.py"}
        if folder == package:  # the top folder's modules may have a row of their own
            modules -= {row.removeprefix("loki_dist/") for row in rows if row.endswith(".py")}
        named = set(re.findall(r"`([a-z0-9_]+\.py)`", rows.get(name, ""))) - {"__init__.py"}
        assert named == modules, (name, sorted(named ^ modules))
    for row in rows:
        assert (REPO / row).exists(), f"README's layout names {row}, which is not in the tree"


def test_every_package_folder_is_shipped():
    """pyproject.toml lists the packages by name: a new stage folder left out of it would be missing
    from a pip install while every test in a checkout passes."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    package = REPO / "loki_dist"
    folders = {".".join(p.parent.relative_to(package.parent).parts) for p in package.rglob("__init__.py")}
    assert folders <= listed, sorted(folders - listed)
