# rlrf: two commands on a fresh machine —  `make round1` (the demo round) and `make test`.
# RECIPE selects another recipe; ARGS passes key.sub=value overrides to every stage.
#   make round1 RECIPE=recipes/ml1m_llama31_8b.yaml ARGS="sample.n=8"

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RECIPE ?= recipes/ml100k_smollm2.yaml
ARGS   ?=
# The CPU build already on this machine; on a GPU node set TORCH=torch (or your CUDA build).
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
RUN    := $(BIN)/python pipelines
LF_VENV ?= .venv-llamafactory

.PHONY: install data test test-integration test-faults test-llamafactory round1 round2 round3 control1 grpo1 evaluate bench clean-runs llamafactory-env

install: $(STAMP)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

data: install
	$(BIN)/python -m rlrf.fetch ml-100k --dest data/raw/ml-100k

test: install data
	$(BIN)/python -m pytest -q

# Whole stages and a whole round with the real SmolLM2 on the tiny recipe (a few minutes).
test-integration: install data
	$(BIN)/python -m pytest -q -m integration

# Faults, stage by stage (tests marked `faults`: kill -9 and resume, damaged parts, SIGTERM, disk full, memory
# preflight, untrusted models and recipes), the integration ones on a real tiny round included. The fast and
# integration tiers run them too, so .ci/run covers them.
test-faults: install data
	$(BIN)/python -m pytest -q -m faults

# One RLRF round k: sample from generator k-1, score with the reward reranker, pair, DPO -> generator k,
# then the is-it-learning check. Every stage resumes where it stopped and is a no-op when done.
define round
	$(RUN)/sample.py --recipe $(RECIPE) --round $(1) $(ARGS)
	$(RUN)/encode.py --recipe $(RECIPE) --round $(1) $(ARGS)
	$(RUN)/train_reranker.py --recipe $(RECIPE) --round $(1) $(ARGS)
	$(RUN)/score.py --recipe $(RECIPE) --round $(1) $(ARGS)
	$(RUN)/pairs.py --recipe $(RECIPE) --round $(1) $(ARGS)
	$(RUN)/dpo.py --recipe $(RECIPE) --round $(1) $(ARGS)
	$(RUN)/check.py --recipe $(RECIPE) --round $(1) $(ARGS)
endef

round1: install data
	$(RUN)/prepare.py --recipe $(RECIPE) $(ARGS)
	$(call round,1)

round2: round1
	$(call round,2)

round3: round2
	$(call round,3)

# The null control of round 1: the same round in a run of its own with chosen and rejected swapped in a seeded half
# of the pairs (pairs.coin_flip), then round 1's generator against the control's on the valid users
# (benchmarks/check_against.py): what the control reproduces is DPO's own doing, not the reward's.
CONTROL_RUN ?= coinflip
control1: round1
	$(MAKE) --no-print-directory round1 ARGS="$(ARGS) run=$(CONTROL_RUN) pairs.coin_flip=true"
	$(BIN)/python benchmarks/check_against.py --recipe $(RECIPE) --against $(CONTROL_RUN) $(ARGS)

# Round 1 trained online instead (GRPO from the same reward: rlrf/grpo.py), in a run of its own (a run is one
# lineage of generators), then the same is-it-learning check on the valid users.
GRPO_RUN ?= grpo_demo
grpo1: install data
	$(RUN)/prepare.py --recipe $(RECIPE) run=$(GRPO_RUN) $(ARGS)
	$(RUN)/grpo.py --recipe $(RECIPE) --round 1 run=$(GRPO_RUN) rounds.trainer=grpo $(ARGS)
	$(RUN)/check.py --recipe $(RECIPE) --round 1 run=$(GRPO_RUN) rounds.trainer=grpo $(ARGS)

evaluate: install data
	$(RUN)/evaluate.py --recipe $(RECIPE) $(ARGS)

bench: install data
	$(BIN)/python benchmarks/ranking_baselines.py --recipe $(RECIPE)
	$(BIN)/python benchmarks/sample_throughput.py
	$(BIN)/python benchmarks/score_throughput.py --recipe $(RECIPE)
	$(BIN)/python benchmarks/dpo_step.py

# LLaMA-Factory pins older transformers/trl/datasets than rlrf, so it gets its own environment; the dpo stage with
# `dpo.backend: llamafactory` runs $(LF_VENV)/bin/llamafactory-cli (or one on PATH). LLaMA-Factory imports torchaudio
# on its train path, so torch, torchvision and torchaudio are one matching set, and torchaudio's last release is 2.11:
# the set is torch 2.11 from PyPI (its CUDA 13 build, ~3 GB with the nvidia wheels; it runs on a CPU as well). On a
# GPU whose driver is older than CUDA 13, set LF_TORCH to the same three versions built for your CUDA (PyTorch's own
# wheel index). The last step is the smoke test: LLaMA-Factory's own version check and its train path's imports.
# Rebuild with `rm -rf $(LF_VENV) && make llamafactory-env`.
LF_VERSION ?= 0.9.5
LF_TORCH   ?= torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0
LF_STAMP   := $(LF_VENV)/.installed

llamafactory-env: $(LF_STAMP)
$(LF_STAMP):
	$(PYTHON) -m venv $(LF_VENV)
	$(LF_VENV)/bin/pip install -q --upgrade pip
	$(LF_VENV)/bin/pip install -q $(LF_TORCH) 'llamafactory==$(LF_VERSION)'
	$(LF_VENV)/bin/pip check
	$(LF_VENV)/bin/python -P rlrf/llamafactory_probe.py --check
	touch $(LF_STAMP)

# The tiny recipe's whole round with dpo.backend=llamafactory (the real llamafactory-cli), round 2 sampling from its
# generator, and the token-for-token check of LLaMA-Factory's rendering against the sample stage's (minutes).
test-llamafactory: install data
	@test -x $(LF_VENV)/bin/llamafactory-cli || { echo "no $(LF_VENV)/bin/llamafactory-cli: run make llamafactory-env first"; exit 1; }
	$(BIN)/python -m pytest -q -m llamafactory

clean-runs:
	rm -rf runs/
