"""A plain (non-editable) install ships the bundled model: `mmdlm.load("shapes-tiny")` works from site-packages."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "mmdlm" / "weights" / "shapes-tiny"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    # --no-build-isolation: the venv already has setuptools, and nothing may be downloaded.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO),
                    "-w", str(out)], check=True, cwd=build, env={**os.environ, "PIP_NO_INDEX": "1"})
    (whl,) = out.glob("mmdlm-*.whl")
    return whl


def test_wheel_contains_weights_and_examples(wheel):
    if not (WEIGHTS / "config.json").is_file():
        pytest.skip("mmdlm/weights/shapes-tiny is not there yet")
    names = zipfile.ZipFile(wheel).namelist()
    for f in WEIGHTS.iterdir():
        assert f"mmdlm/weights/shapes-tiny/{f.name}" in names, f.name
    assert any(n.startswith("mmdlm/demo/examples/") and n.endswith(".png") for n in names)
    size = sum(f.stat().st_size for f in WEIGHTS.iterdir())
    assert size <= 40 * 2**20, f"bundled weights are {size / 2**20:.1f} MB (limit 40 MB)"


def test_installed_package_loads_shapes_tiny_outside_the_repo(wheel, tmp_path):
    if not (WEIGHTS / "config.json").is_file():
        pytest.skip("mmdlm/weights/shapes-tiny is not there yet")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target),
                    str(wheel)], check=True)
    code = ("import mmdlm, pathlib; p = mmdlm.load('shapes-tiny', device='cpu'); "
            "assert 'site' in pathlib.Path(mmdlm.__file__).parts, mmdlm.__file__; "
            "print(type(p).__name__, p.model.config.hidden_size)")
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("MMDLMPipeline")
