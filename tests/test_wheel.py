"""The built wheel carries the suites, templates, check bands and shipped base, and runs outside the checkout."""
from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

from cvit_bench.resources import BASES, CHECKS, SUITES, TEMPLATES, shipped

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cvit_bench"


def test_every_shipped_file_is_declared_package_data():
    """The quick form of the wheel test: every file under the shipped folders matches a package-data pattern."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["cvit_bench"]
    files = [p.relative_to(PACKAGE).as_posix() for folder in (SUITES, TEMPLATES, CHECKS, BASES)
             for p in shipped(folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert files and [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in patterns)] == []
    assert (REPO / SUITES).resolve() == shipped(SUITES)  # the checkout's top-level folders are links to the shipped ones


@pytest.mark.slow
def test_the_wheel_installs_in_a_fresh_venv_and_runs_outside_the_checkout(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
                   check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("cvit_bench-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    site = next((env_dir / "lib").glob("python*/site-packages"))
    # The dependencies (torch is a multi-GB download) come from this interpreter's paths, after the venv's own site-packages.
    reused = [p for p in sys.path if p and Path(p).is_dir() and Path(p).resolve() != REPO]
    (site / "reused-dependencies.pth").write_text("\n".join(reused) + "\n")
    python = env_dir / "bin" / "python"
    # --target: a plain install would see the reused paths' cvit-bench (an editable checkout) and uninstall it there.
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)], check=True, cwd=tmp_path)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "CVIT_BENCH_CACHE")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "user-cache")

    script = site / "bin" / "cvit-bench"  # the wheel's console script (pip --target puts it beside the package)

    def cli(*args: str) -> str:
        done = subprocess.run([script, *args], cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    located = subprocess.run([python, "-c", "import cvit_bench; print(cvit_bench.__file__)"], cwd=work, env=env,
                             capture_output=True, text=True, check=True).stdout
    assert Path(located).resolve().is_relative_to(site.resolve())
    listing = cli("ls")
    assert all(name in listing for name in ("cvit-v2-check", "coin", "smolora-cvit", "ucit"))
    cli("run", "--suite", "cvit-v2-check", "--method", "seqlora", "--max-steps", "1", "--threads", "1", "--results-dir", "results")
    assert (work / "results" / "cvit-v2-check" / "seqlora" / "seed0" / "results.json").is_file()
    assert (tmp_path / "user-cache" / "cvit-bench" / "data").is_dir()  # the cache is the user's, not site-packages
    assert not (site / ".cache").exists()
