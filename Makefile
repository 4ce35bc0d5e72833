# make demo: set up .venv, train the 2-D digits autoencoder and the VAE, evaluate them, write images under runs/.
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

demo: $(VENV)/.installed
	$(PY) -m train --config configs/digits_ae.py --workdir runs/digits_ae
	$(PY) -m train.eval --workdir runs/digits_ae
	$(PY) -m train --config configs/digits_vae.py --workdir runs/digits_vae
	$(PY) -m train.eval --workdir runs/digits_vae
	$(PY) -m train.sample --workdir runs/digits_vae --num 64 --out runs/digits_vae/samples.png
	@echo "demo done. 2-D autoencoder vs PCA: runs/digits_ae/eval.json, runs/digits_ae/eval/codes_scatter.png,"
	@echo "  runs/digits_ae/eval/reconstructions.png; VAE: runs/digits_vae/eval.json, runs/digits_vae/samples.png,"
	@echo "  runs/digits_vae/eval/{samples,interpolations,reconstructions}.png"

test: $(VENV)/.installed-test
	$(PY) -m pytest -n 2 --dist loadfile tests

bench: $(VENV)/.installed-test
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache
