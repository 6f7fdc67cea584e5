# The two README commands: `make demo` and `make test` (each sets up first). `make test-fast` is the
# inner loop: the unit and contract tests, without those marked slow (whole pipelines, real data, the zoo).
VENV := .venv/bin
PYTEST_ARGS ?= -n auto --maxprocesses=4

.PHONY: setup demo test test-fast clean

setup:
	@bash tools/setup.sh

# The main job on an embedded default: the trained dense Fashion-MNIST ResNet-20 that ships with trp-edge
# (trp_edge/pretrained/, top-1 92.50) decomposed to 2.5x fewer MACs at ranks chosen for ONNX Runtime and TFLite,
# fp32 (DEMO_PRECISION=fp32,int8 adds INT8), on this machine (latency tables measured first when calibration/host/
# has none for this CPU),
# then fine-tuned at those ranks with the dense model as teacher (the path that measured best from a trained
# checkpoint: BENCHMARKS.md), exported to trp-edge-out/resnet20-fashion-mnist; then builds for both runtimes,
# timed here, with latency and accuracy per stage in reports/host/. Under 10 minutes here, setup included.
DEMO_FINETUNE ?= 2
DEMO_PRECISION ?= fp32
demo: setup
	$(VENV)/trp-edge compress resnet20-fashion-mnist --data fashion-mnist --scheme spatial --target-speedup 2.5 \
	  --steps 0 --finetune $(DEMO_FINETUNE) --distill --lr 0.01 --force --runtime ort,tflite --precision $(DEMO_PRECISION)
	$(VENV)/trp-edge deploy --target host --local --runtime ort,tflite --precision $(DEMO_PRECISION)

test: setup
	$(VENV)/ruff check trp_edge tests tools
	$(VENV)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(VENV)/ruff check trp_edge tests tools
	$(VENV)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf trp-edge-out .pytest_cache
