#!/usr/bin/env bash
# Run pytest on every MPI rank; only rank 0 prints (all ranks' exit codes count).
rank="${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-${SLURM_PROCID:-0}}}"
py="${GLYMPH_PY:-.venv/bin/python}"
if [ "$rank" = 0 ]; then
  exec "$py" -m pytest -p no:cacheprovider "$@"
else
  exec "$py" -m pytest -p no:cacheprovider -q "$@" > "${TMPDIR:-/tmp}/glymph-pytest-rank$rank.log" 2>&1
fi
