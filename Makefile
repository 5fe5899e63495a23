# Set-up and entry points. `make demo` and `make test` create .venv, install torch (the CUDA 13.0 build, so that
# csrc/*.cu compiles even without a GPU), build and install clipmoe with its extension, then run. Idempotent: stamps
# skip the installs that are done; editing setup.py, pyproject.toml or csrc/ rebuilds the extension.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_STAMP := $(VENV)/.stamp-torch-2.14.1
INSTALL_STAMP := $(VENV)/.stamp-clipmoe
export HF_HUB_OFFLINE := 1

.PHONY: install demo test compile-gpu-triton bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(TORCH_STAMP): | $(BIN)/python
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1 ninja "setuptools>=64"
	touch $@

$(INSTALL_STAMP): $(TORCH_STAMP) setup.py pyproject.toml $(wildcard csrc/*)
	@echo "building clipmoe_kernels._C (log: $(VENV)/install.log)"
	@$(BIN)/pip install -v -e ".[test]" --no-build-isolation > $(VENV)/install.log 2>&1 \
		|| (tail -n 60 $(VENV)/install.log; exit 1)
	@grep -o "clipmoe: building[^)]*)" $(VENV)/install.log | head -n 1
	@grep -oE "(nvcc|c\+\+|g\+\+) .* -c [^ ]+/csrc/[^ ]+\.(cu|cpp)" $(VENV)/install.log \
		| awk '{print "compiled: " $$NF " (" ($$1 ~ /nvcc/ ? "nvcc" : "c++") ")"}'
	@$(BIN)/python -c "import clipmoe; print('clipmoe ops:', clipmoe.available_ops())"
	touch $@

install: $(INSTALL_STAMP)

demo: install
	$(BIN)/clipmoe demo

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests -q

# The ahead-of-time sm_90 compile test again under the Triton of the GPU machine's image (3.6, which its torch 2.11
# pins; this machine's torch 2.14.1 brings 3.8), installed beside the venv's and put first on the path: a kernel that
# only this machine's Triton compiles fails here, not in the GPU check.
GPU_TRITON := 3.6.0
GPU_TRITON_SITE := $(VENV)/triton-$(GPU_TRITON)
$(GPU_TRITON_SITE)/.stamp: | $(BIN)/python
	$(BIN)/pip install -q --no-deps --target $(GPU_TRITON_SITE) triton==$(GPU_TRITON)
	touch $@

compile-gpu-triton: install $(GPU_TRITON_SITE)/.stamp
	PYTHONPATH=$(GPU_TRITON_SITE) $(BIN)/python -c "import triton, sys; \
		sys.exit(0 if triton.__version__ == '$(GPU_TRITON)' else f'imported triton {triton.__version__} from {triton.__file__}')"
	PYTHONPATH=$(GPU_TRITON_SITE) $(BIN)/python -m pytest tests/test_triton_compile.py -q -p no:cacheprovider

BENCH_JSON ?= bench/results/$(shell date +%Y-%m-%d)-$(shell uname -n | cut -c1-12).json
bench: install
	$(BIN)/python -m pytest bench --benchmark -q --benchmark-json $(BENCH_JSON)
	$(BIN)/python -m bench.report $(BENCH_JSON)

clean:
	rm -rf $(VENV) build *.egg-info clipmoe_kernels/_C*.so
