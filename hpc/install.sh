#!/usr/bin/env bash
# Install the glymphmpi stack on Debian 12: Debian packages + .venv.
# Idempotent: re-running only installs what is missing.
# Usage: hpc/install.sh [--no-apt] [--slurm] [--extras "pinn,cohort,..."]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
venv="${GLYMPH_VENV:-$root/.venv}"
extras="${GLYMPH_EXTRAS:-all}"
want_slurm=0
no_apt=0
while [ $# -gt 0 ]; do
  case "$1" in
    --no-apt) no_apt=1 ;;
    --slurm) want_slurm=1 ;;
    --extras) extras="$2"; shift ;;
    *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

say() { echo "[install] $*"; }

pkgs=$(grep -v '^\s*#' "$here/packages.txt" | awk 'NF{print $1}')
if [ "$want_slurm" = 1 ]; then
  pkgs="$pkgs $(grep -v '^\s*#' "$here/slurm/packages.txt" | awk 'NF{print $1}')"
fi

if [ "$no_apt" = 0 ]; then
  if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 \
     || ! grep -q 'VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null; then
    echo "install.sh: this is not Debian 12 with apt; install the packages in hpc/packages.txt by other means or use the Apptainer image (containers/glymphmpi.def, see README)" >&2
    exit 2
  fi
  missing=""
  for p in $pkgs; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      missing="$missing $p"
    fi
  done
  if [ -n "$missing" ]; then
    sudo=""
    if [ "$(id -u)" != 0 ]; then
      if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
        echo "install.sh: missing Debian packages ($missing) and not root; ask an admin or use the Apptainer image" >&2; exit 2
      fi
    fi
    say "apt-get install:$missing"
    $sudo apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends $missing >/dev/null
  else
    say "Debian packages present"
  fi
fi

py=/usr/bin/python3
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv (system site packages: dolfinx, petsc4py, mpi4py, h5py from Debian)"
  "$py" -m venv --system-site-packages "$venv"
fi
stamp="$venv/.glymph-installed"
sig="$(cat "$root/pyproject.toml" "$here/constraints.txt" | sha256sum | cut -c1-16)-$extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sig" ]; then
  say "venv up to date ($venv)"
else
  say "pip install -e .[$extras] (constraint numpy<2, torch==2.13.0)"
  if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check \
      -c "$here/constraints.txt" -e "$root[$extras]" > "$venv/pip-install.log" 2>&1; then
    tail -20 "$venv/pip-install.log" >&2
    echo "install.sh: pip install failed (full log: $venv/pip-install.log)" >&2
    exit 1
  fi
  echo "$sig" > "$stamp"
fi
"$venv/bin/python" - <<'PY'
import numpy
assert numpy.__version__.startswith("1."), f"numpy {numpy.__version__} in the venv: need numpy<2 for Debian's petsc4py"
PY
say "done: $venv/bin/glymph"
