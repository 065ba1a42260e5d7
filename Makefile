# The two commands of the README. Both create the virtual environment .venv when it is missing.
#   make run    train PuXIM (tiny preset) on the built-in synthetic benchmark, then evaluate it
#   make test   run the test suite (CPU, offline)
#   make demo   serve the draw-a-sketch page (tools.demo) with the make-run checkpoint, trained first if missing
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
EXP    ?= synthetic_demo
# pytest-xdist processes of make test (0: the whole suite in this process)
TEST_WORKERS ?= 2
export HF_HUB_OFFLINE ?= 1

DEMO_ARGS ?=

.PHONY: run test demo venv clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -r requirements.txt
	touch $@

run: venv
	$(PY) train.py --exp $(EXP) --overwrite --no_progress
	$(PY) test.py --exp $(EXP) --no_progress

test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder tests

demo: venv
	test -f results/$(EXP)/best.pth || $(MAKE) run EXP=$(EXP)
	$(PY) -m tools.demo --checkpoint results/$(EXP)/best.pth $(DEMO_ARGS)

clean-venv:
	rm -rf $(VENV)
