# The two commands of the README. Both create .venv when missing and install carpool into it
# with the tested versions (requirements/constraints.txt pins torch to the CPU build).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.carpool-installed
PORT ?= 8000

.PHONY: run test install lint bench clean

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c requirements/constraints.txt -e '.[dev,ray]'
	@# The dashboard's browser test drives Debian's Chromium (CI runs as root); elsewhere the
	@# test fails naming what is missing.
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -q && apt-get install -y -q chromium chromium-driver) || \
		echo "warning: could not install chromium + chromium-driver (the dashboard browser test needs them)"
	touch $(STAMP)

install: $(STAMP)

## make run: the OpenAI-compatible server on the embedded default model (Ctrl-C to stop)
run: $(STAMP)
	$(VENV)/bin/carpool serve --port $(PORT)

## make test: the whole test suite (unit, model parity, engine, server end to end)
test: $(STAMP)
	$(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

clean:
	rm -rf $(VENV) build *.egg-info
