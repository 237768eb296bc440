# Two commands for a fresh machine: `make demo` (set up, run the quickstart on a local Ray cluster) and
# `make test` (set up, run the tests). Both create .venv and install idempotently.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
# The CUDA build of torch 2.14.1 runs on CPU and is the pair torchvision/timm/smp import beside
# (the 2.13.0+cpu wheel breaks PyPI's torchvision: REFERENCE.md, Distributed runtime).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: setup test demo lint lint-imports typecheck clean-venv
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]' $(TORCH_PINS)
	touch $(STAMP)

# The Slurm tests need the local two-node cluster (root + apt); in CI a failure to start it fails the run,
# elsewhere those tests skip and say why.
# Two pytest runs: the unit tests on both cores (xdist, one torch/OpenMP thread per worker), then everything else
# serially (one shared Ray cluster, the local Slurm, 2-process gloo runs). Both always run; either exit code other
# than 0 fails the target (5, no tests collected, included).
UNIT_WORKERS ?= 2
test: setup
	bash tests/cluster/local-slurm.sh up >/dev/null || [ "$$CI" != "true" ] || { bash tests/cluster/local-slurm.sh logs; exit 1; }
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest tests/unit -n $(UNIT_WORKERS) $(PYTEST_ARGS); unit=$$?; \
	$(PY) -m pytest tests --ignore=tests/unit $(PYTEST_ARGS); rest=$$?; \
	echo "pytest exit codes: tests/unit $$unit, the rest $$rest"; [ $$unit -eq 0 ] && [ $$rest -eq 0 ]

# Train the quickstart, then predict one synthetic scene with the model it trained (its newest run directory,
# runs/quickstart-<timestamp>, and the export the launcher writes there when the run finishes).
DEMO_SCENE := data/quickstart/demo_scene.tif
demo: setup
	$(VENV)/bin/encdec-launch recipes/quickstart.yaml
	$(PY) -c "from encdec.data.synthetic import write_scene; write_scene('$(DEMO_SCENE)', 128, seed=7)"
	@run=$$(ls -td runs/quickstart-*/ | head -n 1); run=$${run%/}; \
	model=$$run/export; [ -f $$model/model.yaml ] || model=$$run; \
	$(VENV)/bin/encdec-launch predict $$model $(DEMO_SCENE) -o $$run/predict --overwrite && \
	echo "map: $$run/predict/demo_scene.tif  quicklook: $$run/predict/demo_scene.png"

lint: setup
	$(VENV)/bin/ruff check encdec tests benchmarks

# the layering contract of pyproject.toml: config < registry < models < data < distributed < train < launcher
lint-imports: setup
	$(VENV)/bin/lint-imports

typecheck: setup
	$(VENV)/bin/mypy

clean-venv:
	rm -rf $(VENV)
