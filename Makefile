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

# The demo generates with vgen's own reference model (assets/reference, trained on the H200 by
# vgen.models.train) at its demo size, on the CPU: about 30 s on 2 cores.
DEMO_PROMPT ?= a red circle moves right on a plain background
demo: install
	$(PYTHON) -m vgen.cli info assets/reference/model --frames 17 --height 128 --width 128
	$(PYTHON) -m vgen.cli generate --model assets/reference/model --prompt "$(DEMO_PROMPT)" \
		--frames 17 --height 128 --width 128 --steps 16 --guidance 5 --out $(BUILD)/demo.mp4 --sheet

test: install
	$(PYTHON) -m ruff check vgen tests benchmarks
	$(PYTHON) -m pytest -q tests

lint: install
	$(PYTHON) -m ruff check vgen tests benchmarks

clean:
	rm -rf $(BUILD)
