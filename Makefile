# glymphmpi: `make demo` runs the main job, `make test` passes the tests.
# Both install whatever is missing first (hpc/install.sh is idempotent).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
NP ?= 2
# Open MPI as root (CI, containers) and more ranks than cores.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export OMPI_MCA_rmaps_base_oversubscribe := 1
export OMPI_MCA_btl_vader_single_copy_mechanism := none
export PRTE_MCA_rmaps_default_mapping_policy := :oversubscribe
export OMP_NUM_THREADS ?= 1
export MPLBACKEND := Agg
PYTEST_ARGS ?=
# SLURM=0 make test: skip the tests that need the local SLURM (hpc/slurm/up.sh needs root)
SLURM ?= 1

.PHONY: install demo test test-serial test-mpi test-slurm test-slow lint clean

install:
	@bash hpc/install.sh

demo: install
	$(VENV)/bin/glymph demo --out demo-output

test: install
	@bash scripts/install_bids_tools.sh --chromium
	GLYMPH_REQUIRE_BIDS_TOOLS=1 $(MAKE) --no-print-directory test-serial
	$(MAKE) --no-print-directory test-mpi
	@if [ "$(SLURM)" != 0 ]; then $(MAKE) --no-print-directory test-slurm; else echo "SLURM=0: slurm tests skipped"; fi

test-serial:
	$(PY) -m pytest -m "not slurm and not gpu and not slow" $(PYTEST_ARGS)

test-mpi:
	mpirun -n $(NP) bash tests/mpi_pytest.sh -m "mpi and not slow" $(PYTEST_ARGS)

# A real single-node SLURM (hpc/slurm/up.sh) for the tests marked slurm; always taken down again.
test-slurm:
	@bash hpc/install.sh --slurm
	@trap 'bash hpc/slurm/down.sh' EXIT INT TERM; bash hpc/slurm/up.sh && \
	GLYMPH_REQUIRE_SLURM=1 $(PY) -m pytest -m "slurm and not slow" $(PYTEST_ARGS)

test-slow:
	$(PY) -m pytest -m "slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check glymphmpi tests benchmarks

clean:
	rm -rf demo-output .pytest_cache build *.egg-info
