# Set-up and entry points. `make install` then `make test` on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install venv test

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[test]'
	touch $@

# The targets below need the environment to exist, not to be newer than setup.py: they install it when it is
# missing and never re-install it because setup.py was touched (`make install` does that).
venv:
	@test -f $(VENV)/.installed || $(MAKE) --no-print-directory install

test: venv
	$(PY) -m pytest -q tests

# Downloads (scripts/download.py): resumable, verified by loading, size/sha256 recorded in
# downloads/manifest.json. Override the selection: make download-models MODELS="64x64_diffusion 64x64_classifier"
# (or MODELS=all), make download-refs REFS="imagenet256 imagenet128". DOWNLOAD_FLAGS="--force" etc. pass through.
MODELS ?= 256x256_diffusion_uncond 256x256_diffusion 256x256_classifier
REFS ?= imagenet256
DOWNLOAD_FLAGS ?=

.PHONY: download-models download-refs download-inception download-dinov2

download-models: venv
	$(PY) scripts/download.py models $(MODELS) $(DOWNLOAD_FLAGS)

download-refs: venv
	$(PY) scripts/download.py refs $(REFS) $(DOWNLOAD_FLAGS)

download-inception: venv
	$(PY) scripts/download.py inception $(DOWNLOAD_FLAGS)

# DINOv2 ViT-L/14 weights for --metrics ...,fd_dinov2, into torch hub's cache like Inception's.
download-dinov2: venv
	$(PY) scripts/download.py dinov2 $(DOWNLOAD_FLAGS)

# GPU acceptance check (scripts/gpu_check.py over benchmarks/): float16 health, speed per guided step (batch
# 1/8/32/64, the goals), the sampler end to end and feature-extraction throughput on this process's GPU, random
# weights at the real widths (nothing downloaded); about 5 minutes. Writes results/gpu_check/report.{json,md} and
# prints the Markdown.
# GPU_CHECK_FLAGS passes through: "--device cpu --tiny" (the CPU run of the test suite), "--compile off",
# "--model_dir downloads/models" (health on the official checkpoints), "--sections health,speed".
GPU_CHECK_FLAGS ?=

.PHONY: gpu-check

gpu-check: venv
	$(PY) scripts/gpu_check.py $(GPU_CHECK_FLAGS)

# Evaluator regression (evaluations/regression.py): evaluates guided-diffusion's pair
# admnet_guided_upsampled_imagenet256.npz vs VIRTUAL_imagenet256_labeled.npz and prints the differences from the
# upstream TF evaluator's published numbers; without the files or Inception weights it says how to get them.
# Paths: make check-evaluator EVAL_FLAGS="--ref PATH --sample PATH --inception-weights PATH --device cuda".
EVAL_FLAGS ?=

.PHONY: check-evaluator

check-evaluator: venv
	$(PY) -m evaluations.regression $(EVAL_FLAGS)

# Reproduction targets: one sweep per table (configs/experiments/*.yaml), sampled under mpiexec on GPUS
# processes, evaluated against the ADM reference batch, tabulated (results/<experiment>/table/).
# `make -n reproduce-table1` lists the commands; DRY_RUN=1 makes each sweep list its cells and the
# equivalent per-cell commands instead of sampling. Needs `make download-models download-refs download-inception`.
# LAUNCHER replaces the mpiexec line (with the *_AS_ROOT variables Open MPI needs as root, in containers): the
# pip-installed mpiexec starts processes on this node only, so across SLURM nodes use LAUNCHER=srun (in an
# allocation), or LAUNCHER="torchrun --standalone --nproc_per_node 8 --no-python" (it runs the python command).
GPUS ?= 8
NUM_SAMPLES ?= 50000
BATCH_SIZE ?= 32
MPIEXEC ?= $(VENV)/bin/mpiexec
LAUNCHER ?= OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 $(MPIEXEC) -n $(GPUS)
SWEEP = $(if $(DRY_RUN),,$(LAUNCHER) )$(PY) scripts/sweep.py
SWEEP_FLAGS = --set num_samples=$(NUM_SAMPLES) --set batch_size=$(BATCH_SIZE) $(if $(DRY_RUN),--dry_run)
TABLE1 = table1_uncond_ddpm250 table1_uncond_ddim25 table1_cond_ddpm250 table1_cond_ddim25 pag_cg_cond

.PHONY: reproduce-table1 ablation-scale ablation-layers ablation-perturbation

reproduce-table1: venv
	$(foreach e,$(TABLE1),$(SWEEP) configs/experiments/$(e).yaml $(SWEEP_FLAGS) &&) true

ablation-scale: venv
	$(SWEEP) configs/experiments/ablation_scale.yaml $(SWEEP_FLAGS)

ablation-layers: venv
	$(SWEEP) configs/experiments/ablation_layers.yaml $(SWEEP_FLAGS)

ablation-perturbation: venv
	$(SWEEP) configs/experiments/ablation_perturbation.yaml $(SWEEP_FLAGS)

# The embedded demo's models (demo/train.py), written to checkpoints/demo/ with the record TRAINING.md and a
# DDIM-25 sample check (unguided beside PAG s = 3 at input_blocks.5.1, middle_block.1). train-demo: the tiny
# class-conditional ADM model (EMA weights) and its feature net on the generated shapes data set (demo/data.py; about 45 minutes on a shared 2-core CPU). train-demo-mirror: the
# unconditional model `make demo` uses and its feature net, on the textured mirror data set (the right half mirrors
# the left; about 65 minutes; the committed model was trained in two stages, see checkpoints/demo/TRAINING.md).
# TRAIN_DEMO_FLAGS passes through: "--overwrite" to replace the committed files (refused otherwise), "--threads 2"
# on an idle machine.
TRAIN_DEMO_FLAGS ?=

.PHONY: train-demo train-demo-mirror

train-demo: venv
	$(PY) scripts/train_demo.py --what all --steps 1500 --threads 0 --check_samples 64 $(TRAIN_DEMO_FLAGS)

train-demo-mirror: venv
	$(PY) scripts/train_demo.py --what all --dataset mirror --steps 4000 --lr_schedule cosine --max_minutes 88 \
		--threads 0 --check_samples 64 $(TRAIN_DEMO_FLAGS)

# The embedded CPU demo: the whole main job (sweep under mpiexec -n 2, evaluation, table, plots) on the tiny
# unconditional model of checkpoints/demo/ (adm_mirror), every cell over 3 seeds, evaluated with the demo's
# feature network. Writes results/demo/{table.md,plot.png,grid.png,claims.json}. Open MPI needs the *_AS_ROOT variables when run as root (containers, CI).
DEMO_CONFIG ?= configs/demo.yaml
DEMO_PROCS ?= 2

.PHONY: demo

demo: venv
	$(PY) scripts/demo.py prepare --config $(DEMO_CONFIG)
	OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 \
		$(MPIEXEC) --oversubscribe -n $(DEMO_PROCS) $(PY) scripts/sweep.py $(DEMO_CONFIG)
	$(PY) scripts/demo.py finish --config $(DEMO_CONFIG)

# Looking inside PAG on the demo model (analysis/, scripts/analyze.py): samples 0-3 (curves over samples 0-15),
# DDIM-25, s = 2 at the demo's layers, identity PAG and SEG analysed in full, every perturbation kind's perturbed
# x0 side by side. Writes results/analysis/demo/summary.md and the files it links; under a minute on 2 CPU cores
# (one thread: faster than two on a shared machine). ANALYZE_FLAGS adds or overrides flags.
ANALYZE_FLAGS ?=
ANALYZE_DEMO = --model checkpoints/demo/adm_mirror.yaml --device cpu --batch_size 16 \
	--timestep_respacing ddim25 --use_ddim True --pag_scale 2 \
	--pag_layers output_blocks.2.1 \
	--name demo --indices 0-3 --curve_samples 16 --kinds identity,seg --compare_kinds all

.PHONY: analyze-demo

analyze-demo: venv
	OMP_NUM_THREADS=1 $(PY) scripts/analyze.py $(ANALYZE_DEMO) $(ANALYZE_FLAGS)

# FLOPs and GPU-hours of the paper's ADM runs (benchmarks/cost.py): counted with torch's FLOP counter on the meta
# device (full-width models, no memory, seconds on a CPU); hours at an assumed share of the dense fp16 peak
# (COST_FLAGS="--peak-fraction 0.3"). The cost table of docs/reproduction.md is its output.
COST_FLAGS ?=

.PHONY: bench-cost

bench-cost: venv
	$(PY) scripts/bench_cost.py $(COST_FLAGS)

# Beyond PAG (issue 21, item 8): SoftPAG, per-head PAG, TPG, APG and guidance rescale against PAG s = 3 at the
# paper's layers on the unconditional model, ICG against PAG on the conditional one, each at DDIM-25 and DDPM-250
# (configs/experiments/beyond_pag_{uncond,cond}.yaml), sampled, evaluated and tabulated like the targets above.
BEYOND_PAG = beyond_pag_uncond beyond_pag_cond

.PHONY: beyond-pag

beyond-pag: venv
	$(foreach e,$(BEYOND_PAG),$(SWEEP) configs/experiments/$(e).yaml $(SWEEP_FLAGS) &&) true

# The same comparison on the shapes model at demo scale (configs/compare_demo.yaml, 8 methods, s = 2 at
# input_blocks.3.1, input_blocks.5.1, middle_block.1), through `make demo`'s steps:
# results/compare_demo/{table.md,grid.png} (one row of the same seeds per method), the table printed. Within 5 minutes on 2 CPU cores (docs/reproduction.md has a timed run).
COMPARE_DEMO_CONFIG ?= configs/compare_demo.yaml

.PHONY: compare-demo

compare-demo: venv
	$(PY) scripts/demo.py prepare --config $(COMPARE_DEMO_CONFIG)
	OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 \
		$(MPIEXEC) --oversubscribe -n $(DEMO_PROCS) $(PY) scripts/sweep.py $(COMPARE_DEMO_CONFIG)
	$(PY) scripts/demo.py finish --config $(COMPARE_DEMO_CONFIG) --grid rows
