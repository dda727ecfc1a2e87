"""The README's quick start on a stock Debian/Ubuntu: scripts/setup.sh from a shell whose PATH holds only the system
directories, where only the system ``python3`` exists and pip may not install into it (PEP 668).

setup.sh runs for real here (with the system ``python3``, creating real virtual environments), but nothing is
downloaded or installed: ``pip`` is a stub on ``PYTHONPATH`` that logs its calls, and ``apt-get``/``sudo`` are
stubs that log theirs. Each test takes a few seconds (``python3 -m venv`` installs pip into the new environment).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
SYSTEM_PYTHON = shutil.which("python3", path=SYSTEM_PATH)
EXTRAS = ".[test,eval,vae,video,serve,finetune]"


def _system_python_can_make_venvs() -> bool:
    if SYSTEM_PYTHON is None:
        return False
    check = "import ensurepip, sys; sys.exit(sys.version_info < (3, 10))"
    return subprocess.run([SYSTEM_PYTHON, "-c", check], capture_output=True).returncode == 0


needs_system_python = pytest.mark.skipif(
    not _system_python_can_make_venvs(),
    reason="no system python3 (3.10 or later, with ensurepip: Debian's python3-venv) in " + SYSTEM_PATH,
)


def _quick_start() -> list[str]:
    """The commands of the README's quick-start block, without their comments."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quick start") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def test_scripts_parse():
    for script in ("scripts/setup.sh", ".ci/run"):
        subprocess.run(["bash", "-n", str(ROOT / script)], check=True)


def test_readme_commands_need_only_the_system_path_and_ci_runs_them():
    setup_and_train, test = _quick_start()
    assert setup_and_train.startswith("bash scripts/setup.sh && ")
    # every program is the system's bash or one that setup.sh makes in .venv/ (no `python`, no `dfm` on the PATH)
    for command in setup_and_train.split(" && ") + [test]:
        program = command.split()[0]
        assert program == "bash" or program.startswith(".venv/bin/"), command
    lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    code = [line for line in lines if line and not line.startswith("#")]
    assert "bash scripts/setup.sh" in code
    assert code[-1] == test  # CI ends with exactly the README's test command


class Sandbox:
    """A copy of setup.sh in ``tmp/repo``, stub ``pip`` (logging) and stub ``apt-get``/``sudo``/``id``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.repo = tmp / "repo"
        (self.repo / "scripts").mkdir(parents=True)
        shutil.copy(ROOT / "scripts" / "setup.sh", self.repo / "scripts" / "setup.sh")
        self.home = tmp / "home"
        self.home.mkdir()
        self.log = tmp / "calls.jsonl"
        self.pypath = tmp / "py"
        (self.pypath / "pip").mkdir(parents=True)
        (self.pypath / "pip" / "__init__.py").write_text("")
        (self.pypath / "pip" / "__main__.py").write_text(
            "import json, os, sys\n"
            "with open(os.environ['DFM_SETUP_LOG'], 'a') as f:\n"
            "    f.write(json.dumps({'pip': sys.argv[1:], 'prefix': sys.prefix, 'cwd': os.getcwd()}) + '\\n')\n"
        )
        self.bin = tmp / "bin"
        self.bin.mkdir()
        log_call = f'printf \'{{"cmd": "%s"}}\\n\' "$(basename "$0") $*" >> "{self.log}"'
        self.stub("apt-get", log_call)
        self.stub("sudo", f'{log_call}\nexec "$@"')

    def stub(self, name: str, body: str) -> None:
        path = self.bin / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)

    def fake_torch(self, version: str) -> None:
        (self.pypath / "torch").mkdir(exist_ok=True)
        (self.pypath / "torch" / "__init__.py").write_text(f"__version__ = {version!r}\n")

    def run(self, **env: str) -> subprocess.CompletedProcess:
        """setup.sh as `env -i HOME=... PATH=<stubs>:<system dirs> bash scripts/setup.sh` (the stub folder holds no
        python3 and no dfm unless a test adds one)."""
        self.log.unlink(missing_ok=True)
        base = {"HOME": str(self.home), "PATH": f"{self.bin}:{SYSTEM_PATH}", "PYTHONPATH": str(self.pypath),
                "DFM_SETUP_LOG": str(self.log)}  # fmt: skip
        command = ["env", "-i", *(f"{k}={v}" for k, v in {**base, **env}.items()), "bash", "scripts/setup.sh"]
        return subprocess.run(command, cwd=self.repo, capture_output=True, text=True, timeout=120)

    def calls(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def pip_installs(self) -> list[tuple[str, list[str]]]:
        return [(c["prefix"], c["pip"]) for c in self.calls() if c.get("pip", [None])[0] == "install"]

    def commands(self) -> list[str]:
        return [c["cmd"] for c in self.calls() if "cmd" in c]


@needs_system_python
def test_setup_makes_and_reuses_venv_with_only_system_path(tmp_path):
    box = Sandbox(tmp_path)
    result = box.run()
    assert result.returncode == 0, result.stderr
    venv = box.repo / ".venv"
    config = (venv / "pyvenv.cfg").read_text()
    assert f"home = {Path(SYSTEM_PYTHON).parent}\n" in config  # the system python3, not one of the user's PATH
    assert (venv / "bin" / "python").exists() and (venv / "bin" / "activate").exists()
    prefix = str(venv)
    assert box.pip_installs() == [
        (prefix, ["install", "-q", "torch==2.13.0"]),
        (prefix, ["install", "-q", "-e", EXTRAS]),
    ]
    fashion_mnist = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists()
    assert box.commands() == ([] if fashion_mnist else [
        "apt-get update -qq", "apt-get install -y -qq dataset-fashion-mnist"])  # fmt: skip
    assert "activate" in result.stderr

    # Again: the environment is kept, and so is a supported torch (a CUDA build, say).
    (venv / "marker").write_text("kept")
    box.fake_torch("2.5.1+cu121")
    result = box.run()
    assert result.returncode == 0, result.stderr
    assert (venv / "marker").exists() and "creating" not in result.stderr
    assert box.pip_installs() == [(prefix, ["install", "-q", "-e", EXTRAS])]
    box.fake_torch("2.3.0")  # too old: replaced
    assert box.run().returncode == 0
    assert [args for _, args in box.pip_installs()][0] == ["install", "-q", "torch==2.13.0"]


@needs_system_python
def test_setup_asks_sudo_for_python3_venv_when_not_root(tmp_path):
    box = Sandbox(tmp_path)
    box.stub("id", 'if [ "$1" = -u ]; then echo 1000; else exec /usr/bin/id "$@"; fi')
    # a system python3 without Debian's python3-venv: no ensurepip
    box.stub("python3", f'case "$*" in *ensurepip*) exit 1;; esac\nexec {SYSTEM_PYTHON} "$@"')
    result = box.run()
    assert result.returncode == 0, result.stderr
    commands = box.commands()
    assert "sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq" in commands
    install = [c for c in commands if c.startswith("sudo") and " install " in c]
    assert len(install) == 1 and install[0].endswith(" python3-venv")
    assert (box.repo / ".venv" / "pyvenv.cfg").exists()
    assert [prefix for prefix, _ in box.pip_installs()] == [str(box.repo / ".venv")] * 2


@needs_system_python
def test_setup_installs_into_the_active_venv_and_links_it(tmp_path):
    box = Sandbox(tmp_path)
    active = tmp_path / "my-cuda-env"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(active)], check=True)
    env = {"VIRTUAL_ENV": str(active), "PATH": f"{active}/bin:{box.bin}:{SYSTEM_PATH}"}
    result = box.run(**env)
    assert result.returncode == 0, result.stderr
    link = box.repo / ".venv"
    assert link.is_symlink() and link.resolve() == active.resolve()
    assert [prefix for prefix, _ in box.pip_installs()] == [str(active)] * 2
    assert box.run(**env).returncode == 0  # again: the link stays

    # .venv/ is another environment: an error that says what to do, nothing installed
    link.unlink()
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(link)], check=True)
    result = box.run(**env)
    assert result.returncode == 1 and "is another one" in result.stderr
    assert box.pip_installs() == [] and not link.is_symlink()
