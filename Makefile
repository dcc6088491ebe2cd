# mmpipe: two commands for a fresh clone.
#   make run    creates .venv if missing, installs, runs the default recipe on a shipped example
#   make test   the same install, then the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.mmpipe-installed
RECIPE ?= whisper_stt

.PHONY: run test typecheck install bench mutation clean docs

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# constraints.txt pins what loads together here (torch 2.14.1 + torchaudio 2.11.0).
# The CLIP BPE vocabulary is vendored (graphs/assets/clip/): no open-clip-torch needed.
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/mmpipe run $(RECIPE)

test: $(STAMP) typecheck
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

# mypy --strict on dsl/ and runtime/ (config in pyproject.toml). The folders install as
# mmpipe.dsl, mmpipe.runtime, ...: a tree of links gives mypy that layout.
typecheck: $(STAMP)
	@rm -rf build/typecheck && mkdir -p build/typecheck/mmpipe
	@for f in mmpipe/*.py; do ln -s "$$PWD/$$f" build/typecheck/$$f; done
	@for d in dsl runtime graphs recipes; do ln -s "$$PWD/$$d" build/typecheck/mmpipe/$$d; done
	cd build/typecheck && $(abspath $(PY)) -m mypy --config-file $(abspath pyproject.toml) -p mmpipe.dsl -p mmpipe.runtime

# docs/kinds.md is generated from the kinds' declarations (tests/unit/test_docs.py checks it).
docs: $(STAMP)
	$(PY) -m mmpipe.describe > docs/kinds.md

bench: $(STAMP)
	$(PY) benchmarks/runtime.py --quick

# Mutation testing of dsl/, runtime/ and the loop modules (hours; MUTATION_SAMPLE=150 samples per group).
mutation: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt 'cosmic-ray>=8.3'
	$(PY) benchmarks/mutation.py --sample $${MUTATION_SAMPLE:-0}

clean:
	rm -rf $(VENV) outputs .pytest_cache
