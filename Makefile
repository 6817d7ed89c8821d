# Two commands on a fresh machine (Python 3.10+ and the package registries):
#   make demo   train, evaluate, export, score and bench on the bundled sample X-rays
#   make test   the test suite
# Each creates .venv first if it is missing (torch + torchvision from PyPI: about 5.7 GB,
# since PyPI's torch wheel brings the CUDA libraries).

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DEMO   ?= demo-out

.PHONY: demo test venv edge-check clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[cpu,train,dev,ray]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/pneumo-edge train --data samples/chest_xray --out $(DEMO)/r18 --arch resnet18 \
	    --image-size 128 --epochs 4 --min-epochs 2 --force
	$(BIN)/pneumo-edge eval --model $(DEMO)/r18 --data samples/chest_xray/train
	$(BIN)/pneumo-edge export $(DEMO)/r18 --allow-int8-fail
	$(BIN)/pneumo-edge score samples/chest_xray --model $(DEMO)/r18 -o $(DEMO)/scores.csv
	head -5 $(DEMO)/scores.csv
	$(BIN)/pneumo-edge bench --model $(DEMO)/r18 --runtime torch,onnx,onnx-fp16 --batch 1,8 \
	    --iters 10

# includes the clean-venv edge install check (pip install '.[cpu]', no torch, scores samples)
test: venv
	PNEUMO_EDGE_INSTALL_CHECK=1 $(BIN)/pytest -q

# The edge install: only `pip install .[cpu]` (no torch), scoring a model exported by `make demo`.
edge-check: demo
	bash tests/edge_install_check.sh $(DEMO)/r18

clean:
	rm -rf $(DEMO) .pytest_cache
