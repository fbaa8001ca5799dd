# Everything a fresh machine needs goes through `make setup` (idempotent; re-runs when pyproject.toml changes).
PY ?= python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test bench lint docs dashboard train-demo
setup: .setup-stamp
.setup-stamp: pyproject.toml
	$(PY) -m pip install -q -e '.[dev]'
	@command -v prometheus >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq prometheus)
	@# DejaVu fonts for the synthetic training corpus (training/corpus.py falls back to Pillow's own font without them)
	@[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || $(SUDO) apt-get install -y -qq fonts-dejavu-core || true
	@touch $@

demo: setup
	$(PY) -m demo

test: setup
	$(PY) -m pytest -q -ra --durations=25

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The docs site (docs/, mkdocs.yml) into site/; --strict: a broken link, anchor or generated table fails the build.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

bench: setup
	$(PY) benchmarks/engine_cpu.py
	$(PY) benchmarks/pipeline.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/serve_memory.py
	$(PY) benchmarks/autoscale.py --png /tmp/autoscale.png

dashboard: setup  # rebuild infra/grafana/infimm-hd.json from infra/grafana/dashboard.py (Grafana foundation SDK)
	$(PY) infra/grafana/dashboard.py

# Retrain the demo reader (checkpoints/demo-reader/) with the four-stage recipe; see docs/training.md.
train-demo: setup
	bash training/demo_recipe.sh
