# Everything installs itself into .venv on first use; `make demo` and `make test` are all a
# fresh machine needs (Python 3.9+, pip, venv).
VENV ?= .venv
PY := $(VENV)/bin/python
EDGEPROP := $(VENV)/bin/edgeprop

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

.PHONY: demo test test-fast aarch64 bench clean
demo: $(VENV)/.installed  ## export NoProp-DT for digits, train it with onnxruntime, print test accuracy
	$(EDGEPROP) export --rule noprop-dt --model mlp --data digits --out runs/digits --force
	$(EDGEPROP) train runs/digits --data digits --epochs 40
	$(EDGEPROP) eval runs/digits --data digits --runs 5

# The engines that cannot share .venv get their own environments (scripts/engine-venv.sh; the
# tests use them and would build them too).
ENGINE_VENVS := litert tflite-runtime $(if $(filter x86_64,$(shell uname -m)),ort-training)

test: $(VENV)/.installed
	for name in $(ENGINE_VENVS); do scripts/engine-venv.sh $$name || exit 1; done
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=25  # one worker per core (pyproject.toml's addopts)

test-fast: $(VENV)/.installed  ## about a minute: no engine venvs, emulators, end-to-end accuracy or long exports
	$(PY) -m pytest -q -m "not slow"

aarch64: $(VENV)/.installed  ## deploy to an emulated arm64 Debian (qemu-user) and train there; installs the tools
	scripts/install-emulators.sh
	$(PY) -m pytest -q -s tests/test_deploy.py

bench: $(VENV)/.installed  ## accuracy, throughput and memory vs torch: JSON under bench/results/
	$(PY) bench/noprop_digits.py
	$(PY) bench/memory.py
	$(PY) bench/rules.py
	$(PY) bench/engines.py

clean:
	rm -rf runs bench/results .cache
