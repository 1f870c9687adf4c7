"""What `pip install rlrf` gives outside the repo: the recipes and the stage scripts ship in the wheel, and the CLI
lists, copies and runs them from any directory."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from rlrf.config import ConfigError, find_recipe, load_recipe, shipped_recipes
from rlrf.runs import STAGES, script

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    setuptools = tuple(int(x) for x in metadata.version("setuptools").split(".")[:2])
    isolation = [] if setuptools < (77, 0) else ["--no-build-isolation"]  # an old one: pip fetches a newer to build
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, str(REPO), "-w", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return next(out.glob("rlrf-*.whl"))


def test_the_wheel_carries_every_recipe_and_stage_script(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in (REPO / "recipes").glob("*.yaml"):
        assert f"rlrf/recipes/{recipe.name}" in names
    for stage in STAGES:
        assert f"rlrf/pipelines/{script(stage)}.py" in names


def test_every_stage_script_is_a_cli_command_and_the_other_way_round():
    scripts = {p.stem for p in (REPO / "pipelines").glob("*.py")} - {"__init__"}
    assert scripts == {script(s) for s in STAGES}


def test_installed_outside_the_repo_it_lists_copies_and_runs_the_tiny_recipes_prepare(wheel, tmp_path, ml100k_dir):
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}

    def rlrf(*args):
        return subprocess.run([sys.executable, "-m", "rlrf.cli", *args], cwd=work, env=env, capture_output=True,
                              text=True)

    where = subprocess.run([sys.executable, "-c", "import rlrf; print(rlrf.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True).stdout.strip()
    assert where.startswith(str(site)), where  # the installed copy, not this checkout
    listed = rlrf("recipes")
    assert listed.returncode == 0 and "ml100k_smollm2" in listed.stdout and "tiny" in listed.stdout
    assert rlrf("recipes", "cp", "tiny").returncode == 0 and (work / "tiny.yaml").is_file()
    assert rlrf("recipes", "cp", "tiny").returncode == 2  # never overwrites
    r = rlrf("prepare", "--recipe", "tiny", "run=out", f"data.path={ml100k_dir}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (work / "runs" / "out" / "prepare" / "stage.json").is_file()
    assert "943 users" in r.stdout


def test_a_recipe_is_found_by_name_and_a_missing_one_lists_the_shipped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ here: names resolve to the shipped copies
    assert set(shipped_recipes()) >= {"ml100k_smollm2", "tiny"}
    for name in ("tiny", "tiny.yaml", "recipes/tiny.yaml"):
        assert find_recipe(name).read_text() == (REPO / "recipes" / "tiny.yaml").read_text()
    assert load_recipe("recipes/ml100k_smollm2.yaml").run == "ml100k_smollm2"  # the stage scripts' default
    with pytest.raises(ConfigError, match=r"recipe elsewhere/tiny.yaml not found.*ml100k_smollm2.*rlrf recipes"):
        find_recipe("elsewhere/tiny.yaml")  # a path that names another directory is not rewritten
