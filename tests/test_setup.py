"""setup.sh the way a user meets it, on a stock Debian/Ubuntu Python: "externally managed" (PEP 668), `python3` but
no `python` command. In a fresh clone with no env active it creates .venv and installs there, and a second run
installs nothing; inside an activated virtualenv it installs into that env and links .venv to it. Neither run ever
calls `python`. A python3 without ensurepip stops with one line naming the apt package, and an existing .venv is
never deleted to make room for the link. The two install tests run only with DISTIL_SETUP_TEST=1."""

import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # what a fresh login on Debian/Ubuntu has, without ~/.local or pyenv
SYSTEM_PYTHON = "/usr/bin/python3"
IMPORTS = "import torch, transformers, trl, sys; print(torch.__version__, sys.prefix)"

needs_install = pytest.mark.skipif(
    os.environ.get("DISTIL_SETUP_TEST") != "1",
    reason="installs torch and the pinned requirements into fresh envs (minutes, needs a package index); "
           "run with DISTIL_SETUP_TEST=1")


def user_env(tmp_path, path: str, virtual_env: str | None = None) -> dict:
    """This process's environment (pip's index settings, HOME) with no env active and PATH cut to `path`, behind a
    `python` that records being called: setup.sh must never need one."""
    trap = tmp_path / "trap"
    trap.mkdir(exist_ok=True)
    (trap / "python").write_text(f"#!/bin/sh\necho called >> {trap}/python_called\nexit 127\n")
    (trap / "python").chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CONDA", "_CE_", "PYENV")) and k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{trap}:{path}"
    if virtual_env:
        env["VIRTUAL_ENV"] = virtual_env
    return env


def run_setup(repo, env: dict) -> str:
    result = subprocess.run(["bash", "setup.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=3600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def imports(python) -> tuple[str, str]:
    """(torch version, sys.prefix) as `python` sees them, or the failure."""
    result = subprocess.run([str(python), "-c", IMPORTS], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    version, prefix = result.stdout.split()
    return version, prefix


def installed_distributions(env_dir) -> dict:
    """Every installed distribution's metadata folder and its modification time: pip rewrites it on any
    (re)install or upgrade."""
    folders = glob.glob(os.path.join(env_dir, "lib", "python3*", "site-packages", "*.dist-info"))
    return {os.path.basename(f): os.stat(f).st_mtime_ns for f in folders}


@pytest.fixture
def clone(tmp_path):
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip(f"needs the system Python {SYSTEM_PYTHON}")
    system_torch = subprocess.run([SYSTEM_PYTHON, "-c", "import torch"], capture_output=True)
    assert system_torch.returncode != 0, f"{SYSTEM_PYTHON} must be a Python without the packages for this test"
    repo = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", ROOT, str(repo)], check=True, timeout=120)
    return repo


@needs_install
@pytest.mark.slow
def test_no_env_active_creates_venv_and_second_run_installs_nothing(tmp_path, clone):
    env = user_env(tmp_path, SYSTEM_PATH)
    output = run_setup(clone, env)

    venv = clone / ".venv"
    assert venv.is_dir() and not venv.is_symlink(), output[-2000:]
    version, prefix = imports(venv / "bin" / "python")
    assert version.split("+")[0] == "2.13.0"
    assert os.path.realpath(prefix) == os.path.realpath(venv)
    assert not (tmp_path / "trap" / "python_called").exists(), "setup.sh called `python`"

    before = installed_distributions(venv)
    assert any(name.startswith("trl-") for name in before)
    output = run_setup(clone, env)
    assert "torch 2.13.0 already installed" in output, output
    assert installed_distributions(venv) == before, "the second run installed or upgraded something"
    assert not (tmp_path / "trap" / "python_called").exists(), "setup.sh called `python`"


@needs_install
@pytest.mark.slow
def test_active_virtualenv_gets_the_packages_and_venv_links_to_it(tmp_path, clone):
    user_venv = tmp_path / "my-env"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(user_venv)], check=True, timeout=300)
    # What `source my-env/bin/activate` does to the environment.
    env = user_env(tmp_path, f"{user_venv}/bin:{SYSTEM_PATH}", virtual_env=str(user_venv))
    output = run_setup(clone, env)

    link = clone / ".venv"
    assert link.is_symlink() and os.path.realpath(link) == os.path.realpath(user_venv), output[-2000:]
    version, prefix = imports(user_venv / "bin" / "python")
    assert version.split("+")[0] == "2.13.0"
    assert os.path.realpath(prefix) == os.path.realpath(user_venv)
    assert imports(link / "bin" / "python")[0] == version
    assert not (tmp_path / "trap" / "python_called").exists(), "setup.sh called `python`"


def copy_setup(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("setup.sh", "requirements.txt"):
        shutil.copy(os.path.join(ROOT, name), repo / name)
    return repo


def test_python_without_ensurepip_stops_with_the_apt_package(tmp_path):
    # Debian and Ubuntu ship ensurepip in the separate python3-venv package; hide it from a python3 on PATH.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "ensurepip.py").write_text("raise ImportError(\"No module named 'ensurepip'\")\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f"#!/bin/sh\nPYTHONPATH={shadow} exec {sys.executable} \"$@\"\n")
    (bin_dir / "python3").chmod(0o755)
    repo = copy_setup(tmp_path)

    result = subprocess.run(["bash", "setup.sh"], cwd=repo, env=user_env(tmp_path, f"{bin_dir}:{SYSTEM_PATH}"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "sudo apt-get install python3-venv" in result.stderr, result.stdout + result.stderr
    assert not (repo / ".venv").exists()
    assert not (tmp_path / "trap" / "python_called").exists()


def test_active_env_does_not_replace_an_existing_venv(tmp_path):
    repo = copy_setup(tmp_path)
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "keep").write_text("a virtualenv from an earlier run\n")
    active = tmp_path / "active" / "bin"
    active.mkdir(parents=True)
    (active / "python").symlink_to(sys.executable)

    result = subprocess.run(["bash", "setup.sh"], cwd=repo,
                            env=user_env(tmp_path, f"{active}:{SYSTEM_PATH}", virtual_env=str(active.parent)),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "rm -rf .venv" in result.stderr, result.stdout + result.stderr
    assert (repo / ".venv" / "keep").exists() and not (repo / ".venv").is_symlink()
