# Two commands do all the setup on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast fuzz lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned to the local CPU wheel (an unpinned torch pulls a multi-GB CUDA build)
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m pip install --quiet -c constraints.txt -e '.[demo]'
	$(PY) examples/quickstart.py
	$(PY) examples/minilm_trainer.py

lint: install
	$(VENV)/bin/ruff check peftc tests examples benchmarks

test: lint
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# the lifecycle state machine with many fresh examples of up to 60 steps (PEFTC_FUZZ_EXAMPLES, default 200)
fuzz: install
	PEFTC_FUZZ_EXAMPLES=$${PEFTC_FUZZ_EXAMPLES:-200} $(PY) -m pytest -q -p no:logging --hypothesis-show-statistics \
		tests/test_state_machine.py

bench: install
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache .hypothesis out
