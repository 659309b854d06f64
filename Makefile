# Set-up is part of every target: a fresh clone needs only `make run` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
SUITE ?= cvit-v2
METHOD ?= seqlora
JOBS ?= 2
SEEDS ?= 0,1,2
# Make targets keep the cache in the checkout (what `make clean` removes); an installed cvit-bench uses the user cache dir.
export CVIT_BENCH_CACHE ?= $(CURDIR)/.cache

.PHONY: install run test test-floors prepare report bench check leaderboard clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0   # the CPU build; a bare `torch` pulls a multi-GB CUDA build
	$(PY) -m pip install -q -e '.[dev,smolora]'
	touch $@

run: install
	$(VENV)/bin/cvit-bench run --suite $(SUITE) --method $(METHOD)

prepare: install
	$(VENV)/bin/cvit-bench prepare --suite $(SUITE)

report: install
	$(VENV)/bin/cvit-bench report

bench: install
	$(VENV)/bin/cvit-bench bench --suite $(SUITE)

check: install
	$(VENV)/bin/cvit-bench check --suite cvit-v2-check

# Every method x 3 seeds on $(SUITE) (cvit-v2; the frozen cvit-v1 and cvit-v1-multi rebuild with SUITE=...),
# then the CSVs. Finished runs (their results.json files are committed under leaderboards/runs) are
# skipped; interrupted ones resume.
leaderboard: install
	$(VENV)/bin/cvit-bench run --suite $(SUITE) --method all --seeds $(SEEDS) --jobs $(JOBS) --results-dir leaderboards/runs
	$(VENV)/bin/cvit-bench report --results-dir leaderboards/runs --out-dir leaderboards

test: install
	$(VENV)/bin/pytest -q

# The declared lower bounds (constraints/floors.txt) in their own venv; not in CI (downloads torch 2.7.0).
test-floors:
	.ci/test-floors

clean:
	rm -rf .cache results
