# The two commands of the README.  Both create .venv if it is missing and install the project.
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo test install

demo: $(INSTALLED)
	$(VENV)/bin/prism-demo

test: $(INSTALLED)
	$(PY) -m pytest -q

install: $(INSTALLED)

$(PY):
	python3 -m venv $(VENV)

# torch first, pinned to the CPU build on this machine's disk (a looser pin pulls a CUDA build of
# several GB); deepspeed ships as a source archive that builds against that torch, hence no isolation.
$(INSTALLED): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-build-isolation -e ".[dev,hf]"
	touch $@
