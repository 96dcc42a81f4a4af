# x2 super-resolution: the two quick-start commands are `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements.txt
# The demo: a short training on the embedded skimage photos, then its evaluation. The residual model starts at
# bilinear quality, so 300 steps already take it past bicubic; the plain BasicSRModel first has to learn to
# reproduce its input (see README). Batches of 8 32x32 crops (an eighth of the experiments' pixels per step) at twice
# the handout's learning rate, so that the demo stays within a few minutes on CPUs without bf16 instructions too.
DEMO_ARGS ?= run=demo model=residual max_steps=300 batch_size=8 patch_size=32 lr=2e-4 val_every=100 ckpt_every=100

.PHONY: demo test test-slow test-manual test-slurm experiments sweep-30k report bench onnx gpu-check venv data data-standard train evaluate tensorboard clean

demo: venv
	$(PY) code/prepare_data.py
	$(PY) code/train.py $(DEMO_ARGS) resume=auto
	$(PY) code/evaluate.py checkpoint=checkpoints/demo/model.pt
	$(PY) code/compare.py checkpoint=checkpoints/demo/model.pt
	@echo "Table: runs/eval_eval_bilinear.md  Curves: runs/demo/curves.png  TensorBoard: $(VENV)/bin/tensorboard --logdir runs  Page (open in a browser): runs/compare_eval_bilinear/index.html"

test: venv
	$(PY) -m pytest -q

# the end-to-end tests that make test leaves out (a few minutes); CI runs both
test-slow: venv
	$(PY) -m pytest -q -m "slow and not manual"

# the whole committed report regenerated and compared (about an hour), and a real Slurm (installs it; root)
test-manual: venv
	$(PY) -m pytest -q -m manual

# A real single-node Slurm on this machine (installs slurm-wlm + munge with apt when missing; needs root).
test-slurm: venv
	$(PY) -m pytest -q -m manual tests/test_jobs.py

# Reuses an existing venv whose installed requirements equal requirements.txt (compared by content, not time).
venv: $(STAMP)
$(STAMP): requirements.txt
	@if [ -f $@ ] && cmp -s requirements.txt $@; then touch $@; else \
	  set -e; echo "Setting up $(VENV) from requirements.txt (torch is large: a few minutes the first time)"; \
	  [ -x $(PY) ] || $(PYTHON) -m venv $(VENV); \
	  $(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt; \
	  cp requirements.txt $@; fi

data: venv
	$(PY) code/prepare_data.py

# The standard sets the experiments and the report use (T91, BSD200, Set5, Set14, B100: 410 images, ~100 MB) into
# data/, each file checked against its pinned SHA-256; ARGS="source=/a/copy" takes them from a local copy instead.
data-standard: venv
	$(PY) code/prepare_data.py standard $(ARGS)

# e.g. make train ARGS="run=t91 data_dir=data/T91 eval_dir=data/Set5" (after make data-standard)
train: venv
	$(PY) code/train.py $(ARGS)

evaluate: venv
	$(PY) code/evaluate.py $(ARGS)

# Task 5/6's runs, the final model and its ablation on data/<set> (make data-standard; code/experiments.py): trains what is
# missing, continues what stopped. On a GPU: make experiments ARGS=device=cuda
experiments: venv
	$(PY) code/experiments.py $(ARGS)

# Task 5's sweep continued (README: Task 5 experiments): lr 1e-3 and 1e-5 from scratch to the baseline's 30,000
# steps, keeping the step-5,000 weights; resumable (experiments.RUNS has their settings).
sweep-30k: venv
	$(PY) code/experiments.py lr_1e-3 lr_1e-5 $(ARGS)

# The report: runs/report/, README.pdf and README.md's key results, from the committed checkpoints and logs
# (code/report.py evaluates and plots, code/report.typ is the text, set by Typst), and the comparison page of Set14.
report: venv
	$(PY) code/report.py $(ARGS)
	$(PY) code/compare.py checkpoint=checkpoints/residual_matlab,checkpoints/final_t91,checkpoints/final \
	  eval_dir=$${SR_DATA_ROOT:-data}/Set14 degradation=bicubic_matlab crop=160 out=runs/report/compare

# Training-speed ratios on this machine (code/bench.py); ARGS="data_dir=data/T91" for T91.
bench: venv data
	$(PY) code/bench.py $(ARGS)

# The GPU path in one prepared command (code/gpu_check.py): throughput, fp32 vs bf16, determinism, kill + resume,
# a 4000x3000 upscale. About 5 minutes on one GPU; without one it runs a small CPU version and says so.
gpu-check: venv data
	$(PY) code/gpu_check.py $(ARGS)

# The final model as an ONNX file, checked by onnxruntime against PyTorch (code/export.py): final.onnx;
# another checkpoint: make onnx ARGS="checkpoint=checkpoints/demo/model.pt out=demo.onnx"
onnx: venv
	$(PY) code/export.py $(ARGS)

tensorboard: venv
	$(VENV)/bin/tensorboard --logdir runs

clean:
	rm -rf runs/demo checkpoints/demo checkpoints/.demo.lock runs/dataset_check runs/eval_eval_bilinear.md \
	  runs/eval_eval_bilinear.csv runs/compare_eval_bilinear data/train data/eval
