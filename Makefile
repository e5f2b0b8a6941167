# Everything runs in .venv (Python 3.11), built by `make setup`; other targets set it up first.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.evalnorm-setup
PYTEST_ARGS ?=

.PHONY: setup test test-fast lint gpu-check demo demo-mask rescue-demo clean

setup: $(STAMP)

# Rebuilt only when a file that decides what is installed changes: quick when nothing is missing.
$(STAMP): pyproject.toml constraints.txt tools/install_detectron2.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel -c constraints.txt setuptools
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	bash tools/install_detectron2.sh $(PY)
	$(PY) -m pip install -q -c constraints.txt -e ".[detection,dev]"
	$(PY) -c "import evalnorm_det, torchvision.ops; print('evalnorm_det ready:', evalnorm_det.__file__)"
	touch $@

# One torch thread unless told otherwise: the tests' tensors are tiny, and on a machine whose
# other cores are busy, threads that wait for each other made the suite several times slower.
test: setup lint
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest $(PYTEST_ARGS)

# The torch-only core (layers, estimation, conversion): seconds.
test-fast: setup
	$(PY) -m pytest -m "not slow" tests/core $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# On a machine with CUDA: the CUDA tests, the overhead benchmark on CUDA and a short AMP run.
gpu-check: setup
	$(PY) -m benchmarks.gpu_check

demo: setup
	$(PY) tools/train_net.py --config demo/evalnorm_digits_2img.yaml

# The demo as a Mask R-CNN: box and mask AP in every row of the table.
demo-mask: setup
	$(PY) tools/train_net.py --config demo/evalnorm_digits_mask_2img.yaml

# A BN detector trained at 2 images per batch, then rescued: the same weights in every test mode.
BN_DEMO := output/demo_bn_digits_2img
rescue-demo: setup
	test -f $(BN_DEMO)/model_final.pth || $(PY) tools/train_net.py --config demo/bn_digits_2img.yaml
	$(PY) tools/train_net.py --config demo/bn_digits_2img.yaml --eval-only \
		MODEL.WEIGHTS $(BN_DEMO)/model_final.pth TEST.EVALNORM_ROWS "['all']" \
		OUTPUT_DIR $(BN_DEMO)/rescue

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
