# llmconv: install, demo, test, bench, fixtures, and batch conversion of a folder of checkpoints.
#   make demo                 set up and run the main job on the bundled example
#   make test                 set up and run the test suite
#   make test-avx2            the test suite on an emulated AVX2-only CPU (qemu-user; ARGS=... for pytest)
#   make -j4 -k batch MODELS_DIR=ckpts OUT_DIR=converted TO=safetensors
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LLMCONV := $(BIN)/llmconv
PIP_FLAGS ?= -q --disable-pip-version-check

.PHONY: install demo test test-fast test-avx2 lint bench bench-convert bench-export bench-quantize fixtures fuzz batch batch-check batch-models batch-summary clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_FLAGS) -c constraints.txt -e '.[onnx,fused,gguf,peft,dev]'
	touch $@

# The bundled example: a tiny GPT-2 trained on public-domain text (fixtures/models/trained-gpt2).
DEMO_MODEL ?= fixtures/models/trained-gpt2
DEMO_OUT ?= out/demo
demo: install
	rm -rf $(DEMO_OUT) && mkdir -p $(DEMO_OUT)
	$(LLMCONV) inspect $(DEMO_MODEL)
	$(LLMCONV) convert $(DEMO_MODEL) $(DEMO_OUT)/gpt2-bin --to pytorch
	$(LLMCONV) convert $(DEMO_OUT)/gpt2-bin $(DEMO_OUT)/gpt2-sharded --to safetensors --shard-size 1MB
	$(LLMCONV) convert $(DEMO_OUT)/gpt2-sharded $(DEMO_OUT)/gpt2-fp16.safetensors --dtype fp16
	$(LLMCONV) verify $(DEMO_MODEL) $(DEMO_OUT)/gpt2-sharded
	$(LLMCONV) verify $(DEMO_MODEL) $(DEMO_OUT)/gpt2-fp16.safetensors --profile fp16
	$(LLMCONV) convert $(DEMO_MODEL) $(DEMO_OUT)/gpt2-onnx --to onnx
	$(LLMCONV) verify $(DEMO_MODEL) $(DEMO_OUT)/gpt2-onnx/model.onnx --text fixtures/data/heldout.txt
	$(LLMCONV) quantize $(DEMO_OUT)/gpt2-onnx $(DEMO_OUT)/gpt2-int8 --target cpu
	$(LLMCONV) verify $(DEMO_OUT)/gpt2-onnx $(DEMO_OUT)/gpt2-int8 --profile int8 --text fixtures/data/heldout.txt --junit $(DEMO_OUT)/verify-int8.xml
	@echo "demo done: outputs in $(DEMO_OUT)"

# The test command CI runs (.ci/run) and the README gives.
test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# As on a CPU with AVX2 and no AVX-512/VNNI, where onnxruntime's int8 kernels give other figures
# (scripts/emulated_cpu_tests.sh: needs qemu-user; ~5-20x slower). ARGS passes pytest arguments.
test-avx2: install
	TEST_PYTHON=$(BIN)/python scripts/emulated_cpu_tests.sh $(ARGS)

lint: install
	$(BIN)/ruff check llmconv tests fixtures bench scripts

fixtures: install
	$(BIN)/python fixtures/make_fixtures.py out/fixtures

# The long fuzzing campaign over every reader (the default suite runs a short seeded budget of the
# same cases, tests/fuzz): prints outcomes by reader and class, writes out/fuzz/summary.json and
# out/fuzz/findings/, and fails if anything was found. ~25 ms a case on 2 cores: 30000 take ~15 min.
FUZZ_CASES ?= 30000
FUZZ_SEED ?= 0
FUZZ_TIMEOUT ?= 30
fuzz: install
	$(BIN)/python scripts/fuzz_campaign.py --cases $(FUZZ_CASES) --seed $(FUZZ_SEED) --timeout $(FUZZ_TIMEOUT) --out out/fuzz

bench: bench-convert bench-export bench-quantize
bench-convert: install
	$(BIN)/python bench/bench_convert.py
bench-export: install
	$(BIN)/python bench/bench_export.py
bench-quantize: install
	$(BIN)/python bench/bench_quantize.py

# ---- batch conversion --------------------------------------------------------------------------
# One target per checkpoint in MODELS_DIR, so `make -j4 -k batch` converts them in parallel and a
# failure does not stop the rest. Each output is verified (convert verifies by default) and its
# JSON report kept in OUT_DIR/.status; a summary table ends the run, and the exit status is
# non-zero if any model failed.
MODELS_DIR ?= models
OUT_DIR ?= converted
TO ?= safetensors
CONVERT_FLAGS ?=
STATUS := $(OUT_DIR)/.status
EXT_safetensors := .safetensors
EXT_pytorch := .bin
EXT_onnx := .onnx
MODELS := $(notdir $(wildcard $(MODELS_DIR)/*))
STAMPS := $(addprefix $(STATUS)/,$(addsuffix .json,$(MODELS)))
# A file model keeps its stem and gets the destination format's extension; a folder stays a folder.
dest = $(if $(wildcard $(MODELS_DIR)/$(1)/.),$(OUT_DIR)/$(1),$(OUT_DIR)/$(basename $(1))$(EXT_$(TO)))

DESTS := $(foreach m,$(MODELS),$(call dest,$(m)))

batch: install batch-check
	@rc=0; $(MAKE) --no-print-directory -k batch-models || rc=$$?; \
	$(MAKE) --no-print-directory batch-summary; exit $$rc

# Refuse what make cannot do safely: nothing to convert, names with spaces (make splits them), and
# two models that would be written to one output (model.pt and model.bin both give model.safetensors).
batch-check:
	@test -d "$(MODELS_DIR)" || { echo "error: $(MODELS_DIR): no such folder (set MODELS_DIR=...)" >&2; exit 2; }
	@spaced=$$(find "$(MODELS_DIR)" -mindepth 1 -maxdepth 1 -name '* *' -printf '"%f" '); \
	if [ -n "$$spaced" ]; then echo "error: $(MODELS_DIR): make cannot name targets with spaces: $$spaced(rename them)" >&2; exit 2; fi
	@test -n "$(MODELS)" || { echo "error: $(MODELS_DIR): no models in it" >&2; exit 2; }
	@dups=$$(printf '%s\n' $(DESTS) | sort | uniq -d | tr '\n' ' '); \
	if [ -n "$$dups" ]; then echo "error: several models in $(MODELS_DIR) would be written to $$dups(a file keeps its stem and gets the $(EXT_$(TO)) extension: rename one)" >&2; exit 2; fi

batch-models: $(STAMPS)

$(STATUS)/%.json: $(MODELS_DIR)/%
	@mkdir -p $(STATUS)
	@# One status per model: a stale report of the other kind would list it twice (ok and FAILED), and
	@# without "$@" make reruns it next time, also after an interrupted run.
	@rm -f "$@" "$@.failed"
	@echo "converting $* -> $(call dest,$*)"
	@$(LLMCONV) convert "$<" "$(call dest,$*)" --to $(TO) --force --json $(CONVERT_FLAGS) > "$@.part"; \
	rc=$$?; if [ $$rc -eq 0 ]; then mv "$@.part" "$@"; else mv "$@.part" "$@.failed"; \
	echo "FAILED: $* (exit $$rc): see $@.failed" >&2; exit $$rc; fi

batch-summary:
	@$(BIN)/python scripts/batch_summary.py $(STATUS) $(MODELS_DIR)

clean:
	rm -rf out .pytest_cache .ruff_cache
