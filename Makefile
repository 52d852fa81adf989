# Set-up, demo and tests. `make demo` and `make test` install what they need.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
BUILD ?= build

.PHONY: install demo test lint clean

# torch first, pinned: a bare `torch` requirement could pull a multi-GB CUDA build.
$(BUILD)/.installed: pyproject.toml
	@mkdir -p $(BUILD)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==$(TORCH_VERSION)
	$(PYTHON) -m pip install -q -e ".[test]"
	@touch $@

install: $(BUILD)/.installed

# Until the reference model lands, the demo generates with a tiny random-weight Wan pipeline.
demo: install
	$(PYTHON) -m vgen.cli tiny wan $(BUILD)/tiny-wan
	$(PYTHON) -m vgen.cli info $(BUILD)/tiny-wan --frames 9 --height 64 --width 64
	$(PYTHON) -m vgen.cli generate --model $(BUILD)/tiny-wan --prompt "a red circle moves left" \
		--frames 9 --height 64 --width 64 --steps 4 --attention dense --out $(BUILD)/demo.mp4 --sheet

test: install
	$(PYTHON) -m ruff check vgen tests benchmarks
	$(PYTHON) -m pytest -q tests

lint: install
	$(PYTHON) -m ruff check vgen tests benchmarks

clean:
	rm -rf $(BUILD)
