# tensorgraph: `make demo` runs the main job, `make test` runs the tests.
# Both set everything up first: a virtualenv with torch 2.13.0 (CPU), the package, and Graphviz's `dot`.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check

.PHONY: setup test demo lint docs bench train clean dot

setup: $(VENV)/.installed dot

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[dev]'
	touch $@

# Graphviz's `dot` renders the graphs. Installed from Debian's packages when we can; otherwise say how.
dot:
	@command -v dot >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Graphviz (apt-get install graphviz)"; \
	    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null; \
	  elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
	    sudo apt-get update -qq >/dev/null && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null; \
	  fi; \
	  command -v dot >/dev/null 2>&1 || { echo "Graphviz's 'dot' is missing: install it (Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz)"; exit 1; }; \
	}

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/tensorgraph demo

lint: setup
	$(VENV)/bin/ruff check tensorgraph tests benchmarks examples tensorgraph_launcher.py

docs: setup
	$(VENV)/bin/mkdocs build --strict

bench: setup
	$(VENV)/bin/tensorgraph bench

train: setup
	$(VENV)/bin/tensorgraph train

clean:
	rm -rf $(VENV) build *.egg-info site .pytest_cache
