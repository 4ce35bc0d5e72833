# make demo: set up .venv, train the text-to-image latent diffusion demo on shapes (or reuse the finished run),
#            write a prompt -> image grid under runs/.
# make test: set up .venv with the test extra and run the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export JAX_PLATFORMS ?= cpu

.PHONY: demo test install install-test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

DEMO_RUN := runs/shapes_ldm_demo
DEMO_PROMPTS := --prompt "a large red circle on the left" --prompt "a small blue square at the top" \
	--prompt "a large green triangle in the center" --prompt "a small yellow circle on the right" \
	--prompt "a large magenta square at the bottom" --prompt "a small cyan triangle in the center"

demo: $(VENV)/.installed
	$(PY) -m train --config configs/shapes_ldm.py:demo --workdir $(DEMO_RUN)
	$(PY) -m train.sample --workdir $(DEMO_RUN) --per_prompt 8 --out $(DEMO_RUN)/demo_prompts.png \
		--adherence $(DEMO_PROMPTS)
	@echo "demo done: text-to-image samples (one row per prompt) in $(DEMO_RUN)/demo_prompts.png;"
	@echo "  the run (autoencoder, text encoder, U-Net) in $(DEMO_RUN). More: docs/LDM.md."

test: $(VENV)/.installed-test
	$(PY) -m pytest -n 2 --dist loadfile tests

bench: $(VENV)/.installed-test
	$(PY) bench/run_all.py --out bench.json

clean:
	rm -rf runs .pytest_cache
