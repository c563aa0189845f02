# Two commands set everything up on a fresh machine (see README.md):
#   make demo   random checkpoint -> out/demo/speech.wav (random weights: the audio is noise)
#   make test   the whole test suite, parity against the reference included
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

.PHONY: install demo test
install: $(VENV)/.installed

DEMO_CHECKPOINT := out/demo/checkpoint
demo: install
	@test -f $(DEMO_CHECKPOINT)/codec.pth || $(PY) -m s1_mini.testing.make_checkpoint --preset tiny --seed 0 --out $(DEMO_CHECKPOINT)
	$(PY) -m s1_mini.synthesize --checkpoint $(DEMO_CHECKPOINT) --device cpu --precision float32 --seed 0 \
		--text "Hello from S1-mini! This checkpoint has random weights." --out out/demo/speech.wav

# pytest exits 5 when it collects no tests; that is not a failure of the product.
# The dependency audit runs after the tests, whatever they gave, and fails the target too.
test: install
	bash tests/parity/build_reference_env.sh
	bash tests/mms/build_mms_env.sh
	$(PY) -m pytest -q -ra tests; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; \
		VENV=$(VENV) bash .ci/audit.sh || rc=1; exit $$rc
