"""scripts/setup.sh, the install the smoke run starts with, needs nothing of the system's package manager: with dpkg's
lock held (as unattended-upgrades holds it on a fresh cloud VM) it runs through. Go, which only the tests need, comes
with scripts/test.sh (scripts/install_go.sh, which waits for the lock a bounded time).

The setup runs on a new virtualenv that sees this one's packages (a .pth file), so it resolves the requirements as
satisfied and reinstalls llama.cpp's wheel from its cache (~/.cache/qlora-mistral): nothing is downloaded again or
compiled, and this virtualenv is not changed.
"""

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

DPKG_LOCK = Path("/var/lib/dpkg/lock-frontend")
# dpkg and apt lock with fcntl (F_SETLK), which the `flock` command's flock(2) does not block
HOLD = "import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB); " \
       "print('held', flush=True); time.sleep(3600)"


@pytest.fixture
def dpkg_locked():
    if not (DPKG_LOCK.exists() and os.access(DPKG_LOCK, os.W_OK)):
        pytest.skip("needs dpkg's lock file, writable (root on Debian or Ubuntu)")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(DPKG_LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held", "another process holds dpkg's lock"
        yield
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture
def venv_on_this_one(tmp_path) -> Path:
    venv = tmp_path / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], check=True)
    (site_packages,) = venv.glob("lib/python3*/site-packages")
    (site_packages / "this-venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return venv


def test_the_smoke_runs_setup_needs_no_apt_lock(dpkg_locked, venv_on_this_one):
    apt = subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=1", "install", "-y", "-qq", "golang-go"],
                         capture_output=True, text=True, timeout=120)
    assert apt.returncode != 0 and "lock" in apt.stderr, "the lock is held: apt itself cannot go on"
    result = subprocess.run(["bash", "scripts/setup.sh"], cwd=ROOT, capture_output=True, text=True, timeout=1200,
                            env={**os.environ, "VENV": str(venv_on_this_one)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "lock" not in result.stderr and "compiling" not in result.stdout
    assert "torch 2.13.0" in result.stdout and "llama.cpp runs f16, q8_0, q4_k_m GGUF files" in result.stdout
    assert result.stdout.rstrip().endswith("fixtures ready in fixtures")
