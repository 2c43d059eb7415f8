PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test docs conf protos demo demo-model web bench gpu-bundle gpu-check gpu-rehearsal clean

## setup: .venv with the pinned torch 2.11 family, lipsync (and lipsync_client) editable with the dev extras (idempotent;
##   uv from pip's indexes, seconds once its cache holds the wheels, pip where uv fails: tools/install.py)
setup: $(STAMP)

$(STAMP): pyproject.toml tools/install.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip uv
	$(PY) tools/install.py -e ".[dev]"
	touch $(STAMP)

## protos: regenerate the gRPC stubs (committed, in clients/python/lipsync_client/_proto) after editing protos/
protos: setup
	$(PY) -m lipsync.protos

## test: the import contracts (import-linter), the reference site (mkdocs --strict), then the whole suite (CPU;
##   CUDA/TensorRT tests skip with their reason) in TEST_WORKERS processes, each test file in one of them (its
##   servers started once, the longest files first); TEST_WORKERS=0 runs it in this process. The workers and the
##   servers they start already outnumber the cores, so each process runs one OpenMP thread that sleeps when idle:
##   intra-op threads only added synchronisation and spinning (2-core EPYC: 965 → 851 CPU-s, 498 → 442 s)
TEST_WORKERS ?= 4
test: setup
	$(VENV)/bin/lint-imports --no-logo --no-cache
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet
	OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \
		$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

## docs: the reference site (README + docs/) into out/site/; `$(VENV)/bin/mkdocs serve` previews it
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

## conf: write conf/'s default files from the section dataclasses (where every default and its comment live)
conf: setup
	$(PY) -m lipsync.apps.conf_files

## demo: serve the demo model, stream assets/speech.wav through it, write out/demo.mp4
demo: setup
	$(PY) -m lipsync.apps.demo_run

## demo-model: train the demo presenter again: data (espeak-ng) → train → evaluate on held-out speech
##   (~1 h on 2 CPU cores; DEVICE=cuda takes minutes). Writes assets/demo_model and benchmarks/results/demo-model
DEVICE ?= cpu
demo-model: setup
	$(PY) train/make_dataset.py --out out/presenter
	$(PY) train/train.py --data out/presenter/train --eval-data out/presenter/eval --out assets/demo_model \
		--log benchmarks/results/demo-model/train-log.jsonl --device $(DEVICE)
	$(PY) train/train.py --data out/presenter/train --eval-data out/presenter/eval --out assets/demo_model \
		--init assets/demo_model --freeze-encoder --edge-share 0.5 --steps 150 --lr 3e-4 --warmup 10 \
		--checkpoint-every 0 --log benchmarks/results/demo-model/edges-log.jsonl --device $(DEVICE)
	$(PY) train/train.py --data out/presenter/train --eval-data out/presenter/eval --out assets/demo_model \
		--init assets/demo_model --freeze-encoder --edge-share 0.5 --full-edge-share 0.5 \
		--steps 120 --lr 3e-4 --warmup 10 --checkpoint-every 0 --log benchmarks/results/demo-model/finish-log.jsonl \
		--device $(DEVICE)
	$(PY) train/evaluate.py --data out/presenter/eval --model assets/demo_model --out benchmarks/results/demo-model \
		--device $(DEVICE)

## web: serve the demo model on SERVER_PORT and the browser page on WEB_PORT (http://127.0.0.1:8080/); Ctrl-C stops both
SERVER_PORT ?= 50051
WEB_PORT ?= 8080
web: setup
	@$(PY) -m lipsync serve server.port=$(SERVER_PORT) & server=$$!; trap 'kill $$server 2>/dev/null' EXIT INT TERM; \
	$(PY) -m lipsync web --server 127.0.0.1:$(SERVER_PORT) --port $(WEB_PORT)

## bench: this machine's pipeline figures into benchmarks/results/
bench: setup
	$(PY) benchmarks/bench_pipeline.py --out benchmarks/results/pipeline-$$($(PY) -c 'import torch;print("cuda" if torch.cuda.is_available() else "cpu")').json

## gpu-bundle: the wheels a GPU host without network lacks (tools/gpu-bundle.txt, derived from pyproject.toml: hydra,
##   the standard gRPC health and reflection services, the client's codecs; ~1 MiB) into .whl/, downloaded here for
##   CPython 3.12 on manylinux x86_64. Carry .whl/ with the checkout to the GPU host
gpu-bundle:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) tools/gpu_bundle.py fetch

## gpu-check: on a CUDA machine, the CUDA tests + every benchmark → benchmarks/results/*-cuda-<gpu>.json, in one
##   device call (9 min budget; STEPS=live,engines picks steps). NO_SETUP=1 PY=python3 runs on the host's own
##   Python instead of .venv: the device bundle (make gpu-bundle) is installed into out/gpu-site first, offline,
##   and the checkout's lipsync and lipsync_client are put on PYTHONPATH
GPU_SITE := out/gpu-site
gpu-check: $(if $(NO_SETUP),,setup)
	$(if $(NO_SETUP),$(PY) tools/gpu_bundle.py install --target $(GPU_SITE))
	PYTHONPATH=$(if $(NO_SETUP),$(CURDIR)/$(GPU_SITE):)$(CURDIR)/clients/python:$(CURDIR) \
		$(PY) benchmarks/gpu_check.py $(if $(STEPS),--steps $(STEPS))

## gpu-rehearsal: what gpu-check meets, on this machine's CPU: a Python 3.12 venv holding only the GPU host's packages
##   (tools/gpu-image-requirements.txt; built once into out/gpu-rehearsal/venv), the bundle installed as gpu-check
##   installs it, the in-process GPU path imported on the bare image, the CUDA tests collected, every gpu-check step
##   run at the smallest sizes, the CUDA-serving tests' bodies on the CPU (~7 min on 2 cores once the venv exists)
gpu-rehearsal: setup
	$(PY) tools/gpu_rehearsal.py $(if $(STEPS),--steps $(STEPS))

clean:
	rm -rf out .pytest_cache
