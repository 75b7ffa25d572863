# Each target creates .venv on first use and installs what it needs: `make demo` the package
# alone, `make eval-demo` also the demo-labels extra (dlib), `make test` (and `make install`) the
# test tools, Triton, DALI, DeepSpeed and timm, `make bench` also the bench extra (faiss).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: demo eval-demo test bench install clean

# The package and what the demo run needs (CPU torch, no DALI, Triton or DeepSpeed).
# The package is installed against the venv's torch (--no-build-isolation), so that setup.py builds
# the C++ backend (csrc/) with it.
INSTALL := $(PIP) install -q --no-build-isolation --use-pep517 "numpy<2.4" -e

$(VENV)/.base: setup.py Makefile $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0 "setuptools>=77" wheel ninja
	$(INSTALL) .
	touch $@

$(VENV)/.installed: $(VENV)/.base
	$(INSTALL) ".[test,dali,deepspeed]"
	# Triton 3.6 (as on the GPU machines) runs the kernels in its interpreter on CPU.
	$(PIP) install -q "triton==3.6.0"
	# timm declares torchvision, but PyPI's torchvision wheels are CUDA builds that cannot load
	# beside CPU torch; the ViT parity test needs only timm's model code (see tests/conftest.py).
	$(PIP) install -q --no-deps "timm>=1.0"
	touch $@

install: $(VENV)/.installed

# A rerun replaces the last demo run (--overwrite).
demo: $(VENV)/.base
	$(PY) train.py --config demo --output runs/demo --overwrite

runs/demo/encoder.safetensors:
	$(MAKE) demo

# The demo encoder against a random-init one on the embedded faces, with dlib's pseudo-labels.
$(VENV)/.demo-labels: $(VENV)/.base
	$(INSTALL) ".[demo-labels]"
	touch $@

eval-demo: $(VENV)/.demo-labels runs/demo/encoder.safetensors
	$(PY) -m pacofr.eval_demo --encoder runs/demo/encoder.safetensors --output runs/eval-demo

# PACOFR_EXPECT_NATIVE: the tests fail, rather than skip, if the C++ backend was not built.
test: $(VENV)/.installed
	PACOFR_EXPECT_NATIVE=1 $(PY) -m pytest -q tests

$(VENV)/.bench: $(VENV)/.installed
	$(INSTALL) ".[bench]"
	touch $@

bench: $(VENV)/.bench
	$(PY) -m pytest benchmarks/

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache runs/demo runs/eval-demo build dist
