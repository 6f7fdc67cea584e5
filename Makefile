# The two README commands: `make demo` and `make test` (each sets up first).
VENV := .venv/bin
PYTEST_ARGS ?=

.PHONY: setup demo test test-all clean

setup:
	@bash tools/setup.sh

# The main job on an embedded default: TRP (spatial, e=0.02, Nu) on Fashion-MNIST ResNet-20 for
# one epoch on the CPU, then decomposition, ONNX export and the report in trp-edge-out/resnet20;
# then ONNX Runtime and TFLite builds for this machine, run here, with latency reports in reports/host/.
demo: setup
	$(VENV)/trp-edge compress resnet20 --data fashion-mnist --scheme spatial --energy 0.02 \
	  --nuclear 3e-4 --epochs 1 --lr 0.05 --force
	$(VENV)/trp-edge deploy --target host --local --runtime ort,tflite

test: setup
	$(VENV)/ruff check trp_edge tests tools
	$(VENV)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf trp-edge-out .pytest_cache
