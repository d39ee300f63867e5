"""The Apptainer recipe (containers/glymphmpi.def).

Apptainer cannot be installed on these machines, so no image is built here. What is
tested: the recipe's structure (header, known sections, shell syntax of its scripts, the
files it copies exist), that it installs through hpc/install.sh and hence the same
hpc/packages.txt, and (``slow``) that its %post and %test succeed in a Debian 12 chroot
made with debootstrap.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEF = ROOT / "containers" / "glymphmpi.def"
SECTIONS = {"labels", "help", "files", "environment", "post", "test", "runscript", "setup", "startscript"}


def parse_def(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """Header keywords and ``%section`` bodies of an Apptainer definition file."""
    header: dict[str, str] = {}
    sections: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^%(\w+)(\s+[\w-]+)?\s*$", line)
        if m:
            current = m.group(1) + (f" {m.group(2).strip()}" if m.group(2) else "")
            if current in sections:
                raise ValueError(f"section %{current} twice")
            sections[current] = ""
            continue
        if current is None:
            if line.strip() and not line.lstrip().startswith("#"):
                k, _, v = line.partition(":")
                header[k.strip()] = v.strip()
        else:
            sections[current] += line + "\n"
    return header, sections


def test_recipe_structure():
    header, sec = parse_def(DEF.read_text())
    assert header["Bootstrap"] in ("docker", "debootstrap")
    assert "bookworm" in header.get("From", "") or header.get("OSVersion") == "bookworm"
    assert {s.split()[0] for s in sec} <= SECTIONS | {"apprun"}
    assert {"post", "test", "runscript", "environment", "files"} <= set(sec)
    for name in ("post", "test", "runscript", "environment", "apprun bids"):
        r = subprocess.run(["bash", "-n"], input=sec[name], capture_output=True, text=True)
        assert r.returncode == 0, f"%{name}: {r.stderr}"
    assert re.search(r"exec\s+\S*glymph\s+\"\$@\"", sec["runscript"])
    assert "glymph" in sec["test"] and "mpirun -n 2" in sec["test"]
    # %files: every source exists in the repository (the build runs from its root)
    for line in sec["files"].splitlines():
        if line.strip() and not line.strip().startswith("#"):
            src = line.split()[0]
            assert (ROOT / src).exists(), src


def test_runscript_dispatches_the_bids_app_form(tmp_path):
    """``apptainer run IMAGE BIDS_DIR OUT participant`` is ``glymph bids ...``; anything else is ``glymph ...``."""
    _, sec = parse_def(DEF.read_text())
    stub = tmp_path / "glymph"
    stub.write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    stub.chmod(0o755)
    (tmp_path / "data").mkdir()
    for name in ("runscript", "apprun bids"):
        body = sec[name].replace("/opt/glymphmpi/.venv/bin/glymph", str(stub))
        for args, want in (([str(tmp_path / "data"), "/out", "participant"], "bids"),
                           (["cohort", "run", "c.toml", "--out", "o"], "cohort"),
                           ([str(tmp_path / "data"), "/out", "group"], "bids")):
            r = subprocess.run(["bash", "-c", body, "runscript", *args], capture_output=True, text=True)
            first = r.stdout.splitlines()[0]
            assert first == (want if name == "runscript" else "bids"), (name, args, r.stdout)


def test_recipe_installs_like_install_sh():
    """The image installs through hpc/install.sh, which reads hpc/packages.txt: one package list."""
    _, sec = parse_def(DEF.read_text())
    post = sec["post"]
    assert re.search(r"bash hpc/install\.sh", post)
    assert "apt-get install" not in post  # no second package list in the recipe
    files = sec["files"]
    assert re.search(r"(?m)^\s*hpc\s+/opt/glymphmpi/hpc\s*$", files)  # packages.txt, constraints.txt
    assert re.search(r"(?m)^\s*pyproject\.toml\s", files)
    inst = (ROOT / "hpc" / "install.sh").read_text()
    assert "packages.txt" in inst and "constraints.txt" in inst
    pkgs = [ln.split()[0] for ln in (ROOT / "hpc" / "packages.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    assert "python3-dolfinx-real" in pkgs and "openmpi-bin" in pkgs
    # the job templates take an image and then run apptainer exec (--nv with GPUs)
    for name in ("romt", "fem", "pinn"):
        t = (ROOT / "jobs" / f"{name}.sbatch").read_text()
        assert "cli=(apptainer exec)" in t and "--nv" in t and 'GLYMPH_IMAGE' in t


def _chroot_ok() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not shutil.which("debootstrap"):
        return "needs debootstrap (apt-get install debootstrap)"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_chroot_ok() is not None, reason=str(_chroot_ok()))
def test_post_and_test_in_debian12_chroot(tmp_path_factory):
    """%post then %test of the recipe in a debootstrap'ed Debian 12 (network: Debian + PyPI)."""
    _, sec = parse_def(DEF.read_text())
    root = Path(os.environ.get("GLYMPH_CHROOT") or tmp_path_factory.mktemp("chroot") / "bookworm")
    if not (root / "etc" / "os-release").exists():
        r = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(root),
                            "http://deb.debian.org/debian"], capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
    for line in sec["files"].splitlines():
        if line.strip() and not line.strip().startswith("#"):
            src, dst = line.split()
            target = root / dst.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / src).is_dir():
                shutil.copytree(ROOT / src, target, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(ROOT / src, target)
    shutil.copy2("/etc/resolv.conf", root / "etc" / "resolv.conf")
    # the same package sources as this machine: its pip configuration and local wheel folders
    # (a cluster build uses PyPI directly); Debian packages come from the chroot's own mirror
    for conf in ("/etc/pip.conf", "/etc/xdg/pip"):
        if Path(conf).exists():
            dst = root / conf.lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if Path(conf).is_dir() else shutil.copy2)(conf, dst, **(
                {"dirs_exist_ok": True} if Path(conf).is_dir() else {}))
    binds = [Path(p) for p in ("/opt/wheels", "/opt/pypi", "/opt/pypi-more") if Path(p).is_dir()]
    pip_env = {k: v for k, v in os.environ.items() if k.startswith("PIP_")}
    if Path(pip_env.get("PIP_CERT", "/nonexistent")).is_file():  # a TLS proxy's CA, as on this host
        shutil.copy2(pip_env["PIP_CERT"], root / "etc" / "glymph-host-ca.crt")
        pip_env["PIP_CERT"] = "/etc/glymph-host-ca.crt"
    mounts = []
    try:
        for m in ("proc", "sys", "dev"):
            (root / m).mkdir(exist_ok=True)
            subprocess.run(["mount", "--bind" if m == "dev" else "-t", *(["/dev"] if m == "dev" else
                            [{"proc": "proc", "sys": "sysfs"}[m], m]), str(root / m)], check=True)
            mounts.append(root / m)
        if Path("/dev/pts").is_dir():
            (root / "dev" / "pts").mkdir(exist_ok=True)
            subprocess.run(["mount", "--bind", "/dev/pts", str(root / "dev" / "pts")], check=True)
            mounts.append(root / "dev" / "pts")
        for b in binds:
            (root / str(b).lstrip("/")).mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "--bind", str(b), str(root / str(b).lstrip("/"))], check=True)
            mounts.append(root / str(b).lstrip("/"))
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
               "LANG": "C.UTF-8", **pip_env}
        for name in ("post", "test"):
            (root / f"glymph-{name}.sh").write_text(sec[name])
            r = subprocess.run(["chroot", str(root), "/bin/bash", f"/glymph-{name}.sh"], env=env,
                               capture_output=True, text=True, timeout=2400)
            assert r.returncode == 0, f"%{name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        assert "glymphmpi container test: OK" in r.stdout
    finally:
        for m in reversed(mounts):
            subprocess.run(["umount", "-l", str(m)])
