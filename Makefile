# Developer shortcuts. `make test` is the README's test command minus the install.
.PHONY: install build test test-gpu bench bench-smoke lint demo

install:
	pip install torch==2.13.0 && pip install -e ".[dev]"

build:  ## rebuild kalm_fast._C in place after editing csrc/
	python setup.py build_ext --inplace

test:
	pytest

test-gpu:  ## GPU-marked tests only (needs CUDA)
	pytest -m gpu

bench:  ## every suite on the default device, results under bench/results/<device>/
	python -m bench

bench-smoke:
	python -m bench --smoke --no-write

lint:
	ruff check .

demo:
	kalm-fast demo
