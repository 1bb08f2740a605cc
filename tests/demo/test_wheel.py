"""featx from a built wheel, outside the checkout: `featx demo` finds its recipes (package data) and runs."""
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_demo_runs_from_an_installed_wheel(tmp_path):
    wheels, target, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    work.mkdir()
    # a copy of the source, so the build's own folders (build/, *.egg-info) are not written into the checkout
    source = shutil.copytree(REPO, tmp_path / "source", ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", ".venv", ".pytest_cache"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)], check=True,
                   cwd=work, timeout=300, capture_output=True)
    wheel = [f for f in os.listdir(wheels) if f.endswith(".whl")]
    assert len(wheel) == 1
    subprocess.run(pip + ["install", "--no-deps", "--target", str(target), str(wheels / wheel[0])], check=True,
                   cwd=work, timeout=300, capture_output=True)
    # The wheel's featx comes first on the path, before the checkout or any editable install of it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(target), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    where = subprocess.run([sys.executable, "-c", "import featx; print(featx.__file__)"], env=env, cwd=work,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(target)), where
    r = subprocess.run([sys.executable, "-m", "featx", "demo", "--items", "40", "--out", "d", "--quiet"], env=env,
                       cwd=work, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = work / "d" / "report" / "report.html"
    assert report.is_file() and f"report at {report}" in r.stdout
    assert (work / "d" / "extract.yaml").is_file() and "Traceback" not in r.stderr
