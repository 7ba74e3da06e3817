"""The wheel carries kernels/ and the installed package finds it there."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_kernels_and_finds_them(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
    )
    (wheel,) = tmp_path.glob("cuflash-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for f in (ROOT / "kernels").iterdir():
        assert f"cuflash/kernels/{f.name}" in names
    assert "cuflash/__init__.py" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = dict(os.environ, PYTHONPATH=str(site))
    found = subprocess.run(
        [sys.executable, "-c", "import cuflash._compile as c; print(c.kernels_dir())"],
        check=True, capture_output=True, text=True, env=env, cwd=tmp_path,
    ).stdout.strip()
    assert Path(found) == site / "cuflash" / "kernels"
