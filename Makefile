# The two commands a newcomer needs: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup world demo test bench clean
setup:
	@bash scripts/setup.sh

# The MetaDrive venv (.venv-world): scene rendering, for the tests, the benches and `owled build-default`.
world: setup
	@bash scripts/setup_world.sh

demo: setup
	$(VENV)/bin/owled demo

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: world
	@. $(VENV)/bin/activate && python -m pytest -q test; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

# Regenerates bench/results/ and every table and figure in README.md and docs/ (docs/benchmarks.md).
bench: world
	$(PY) bench/text_check.py --out bench/results
	[ -d bench/results/work-world-train ] || $(VENV)/bin/owled calib world bench/results/work-world-train --count 2816 --seed 0
	[ -d bench/results/work-world-heldout ] || $(VENV)/bin/owled calib world bench/results/work-world-heldout --count 200 --seed 1000000
	[ -d bench/results/work-world-calib ] || $(VENV)/bin/owled calib world bench/results/work-world-calib --count 32 --seed 1500000
	$(PY) bench/world_lights.py --frames bench/results/work-world-heldout --out bench/results
	$(PY) bench/encoder_choice.py --train bench/results/work-world-train --heldout bench/results/work-world-heldout \
		--steps 300 400 --heldout-count 200 --out bench/results --save bench/results/work-encoder-choice
	$(PY) bench/world_picture.py --model default \
		--frames bench/results/work-world-heldout --index 3 --out docs/metadrive_frame_set.png
	$(VENV)/bin/owled bench --out bench/results --calib bench/results/work-world-calib --eval bench/results/work-world-heldout
	$(PY) bench/encoder_sensitivity.py --calib bench/results/work-world-calib --eval bench/results/work-world-heldout --out bench/results
	$(PY) bench/drive_node.py --frames bench/results/work-world-heldout --calib bench/results/work-world-calib --out bench/results
	$(PY) bench/cpu_sparse.py --out bench/results
	$(PY) bench/default_model.py --out bench/results --frames bench/results/work-world-heldout
	$(PY) bench/byo_model.py --out bench/results
	$(PY) bench/runtime.py --frames bench/results/work-world-heldout --out bench/results
	$(PY) bench/load.py --minutes 10 --out bench/results
	$(PY) bench/demo.py --out bench/results
	OWLED_SUITE_RESULTS=bench/results/tests.json $(MAKE) test
	$(PY) bench/update_readme.py

clean:
	rm -rf build $(VENV) .venv-world
