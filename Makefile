# The two README commands: `make demo` and `make test` (each sets up first). `make test-fast` is the
# inner loop: the unit and contract tests, without those marked slow (whole pipelines, real data, the zoo).
VENV := .venv/bin
PYTEST_ARGS ?= -n auto --maxprocesses=4

.PHONY: setup demo test test-fast clean

setup:
	@bash tools/setup.sh

# The main job on an embedded default: TRP (spatial, e=0.02, Nu) on Fashion-MNIST ResNet-20 for
# one epoch on the CPU with ranks chosen for ONNX Runtime and TFLite, fp32 and INT8, on this machine
# (latency tables measured first when calibration/host/ has none for this CPU), then decomposition,
# ONNX export and the report in trp-edge-out/resnet20; then fp32 and INT8 builds for both runtimes,
# timed here, with latency and accuracy per stage in reports/host/.
demo: setup
	$(VENV)/trp-edge compress resnet20 --data fashion-mnist --scheme spatial --energy 0.02 \
	  --nuclear 3e-4 --epochs 1 --lr 0.05 --force --runtime ort,tflite --precision fp32,int8
	$(VENV)/trp-edge deploy --target host --local --runtime ort,tflite --precision fp32,int8

test: setup
	$(VENV)/ruff check trp_edge tests tools
	$(VENV)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(VENV)/ruff check trp_edge tests tools
	$(VENV)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf trp-edge-out .pytest_cache
