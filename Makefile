# Two commands from a fresh clone: `make demo` and `make test` (both run `make setup` first).
# `make setup` is idempotent: a second run installs nothing (stamp file + each step checks first).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.sdconet-setup
export SDCONET_DATASETS ?= $(CURDIR)/datasets
# 2-core machines: do not oversubscribe the BLAS/OpenMP pools.
export OMP_NUM_THREADS ?= 2

.PHONY: setup demo test data clean-venv

setup: $(STAMP)

$(STAMP): setup.py tools/install_detectron2.py Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')" 2>/dev/null \
	  || $(PIP) install $(TORCH_PINS)
	$(PY) tools/install_detectron2.py
	$(PIP) install --no-build-isolation -e ".[test]"
	@touch $(STAMP)
	@echo "setup done: $(VENV) holds torch, detectron2 and sdconet"

data: setup
	$(PY) datasets/make_synthetic.py --out $(SDCONET_DATASETS)

DEMO_CONFIG ?= configs/quick_schedules/sdconet_tiny_synthetic_stride4.yaml
DEMO_OUT ?= output/demo

demo: data
	$(PY) tools/visualize_data.py --dataset synthetic_rs_test --num 4 --out $(DEMO_OUT)/data_samples
	$(PY) tools/train_net.py --config-file $(DEMO_CONFIG) OUTPUT_DIR $(DEMO_OUT)
	$(PY) tools/plot_metrics.py $(DEMO_OUT)/metrics.json --out $(DEMO_OUT)/curves
	for kind in predictions saliency sr; do \
	  $(PY) tools/visualize.py $$kind --config-file $(DEMO_CONFIG) --weights $(DEMO_OUT)/model_final.pth \
	    --num 2 --out $(DEMO_OUT)/pictures || exit 1; done
	@echo "demo done: metrics in $(DEMO_OUT)/final_metrics.json, curves in $(DEMO_OUT)/curves, pictures in $(DEMO_OUT)/pictures and $(DEMO_OUT)/data_samples"

test: setup
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
