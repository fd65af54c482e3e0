# lorakit: dataset-to-LoRA build.
#
#   make demo     run the whole flow on the bundled example (examples/tiny-dataset, tiny models)
#   make test     install the ONNX Runtime library and the browser test's Chromium, build everything
#                 and run all tests
#   make fuzz     the hostile-input property tests with more cases (FUZZ_CASES=500, FUZZ_SEED=n;
#                 make test runs 16 cases per property from a fixed seed)
#   make bench    every stage's benchmark in one table (bench/all.sh; QUICK=1: tiny models only,
#                 BIN_DIR=folder: prebuilt release binaries), also written to bench/results/latest.md
#   make lora DATA=my/images OUT=runs/me MODEL=sd15.safetensors TAGGER_DIR=wd14_tagger_model \
#             TAGGER=SmilingWolf/wd-v1-4-convnext-tagger-v2 BLIP=blip-large RES=512,512 STEPS=1600
#   make lora DATA=img REG=reg MODEL=sd15.safetensors    (a kohya layout: <repeats>_<name> folders,
#             captions from their caption files or folder names; or DATASET_CONFIG=dataset.toml)
#
#   make dataset DATA=img REG=reg   a kohya DreamBooth layout as one metadata JSON (prepare-dataset)
#   make samples PROMPTS=prompts.txt   images of the trained LoRA (generate-images)
#
# Stages (one target each): lint tags captions metadata latents te-cache train; `lora` runs them
# all in order. Every stage target runs its tool, and every tool checks per item, by content key,
# what is already up to date: an unchanged dataset does no model work at all, one edited caption
# re-encodes one text-encoder entry, one replaced image is re-tagged, re-captioned and re-encoded
# alone. Outputs are rewritten only when their content changes, so their mtimes stay meaningful.
# Stages are chained through their output files, which makes `make -j` safe.
#
# Caption and tag files you wrote or edited are yours: tag-images and caption-images keep them
# (and say how many they kept); they regenerate only the files they wrote themselves. OVERWRITE=1
# replaces yours too, after copying each to <name>.bak.

SHELL       := /bin/bash
CARGO       ?= cargo
PROFILE     ?= debug
BIN         ?= $(or $(CARGO_TARGET_DIR),target)/$(PROFILE)
OUT         ?= out/demo
DATA        ?= $(OUT)/dataset
EXAMPLE     := examples/tiny-dataset
MODEL       ?= tests/fixtures/sd15-tiny/model.safetensors
TAGGER_DIR  ?= tests/fixtures
TAGGER      ?= wd14-tiny
BLIP        ?= tests/fixtures/blip-tiny
RES         ?= 256,256
MIN_BUCKET  ?= 128
MAX_BUCKET  ?= 512
BUCKET_STEP ?= 64
STEPS       ?= 20
DIM         ?= 4
ALPHA       ?= 1
LR          ?= 1e-4
BATCH       ?= 2
NAME        ?= lora
SEED        ?= 42
CAPTION_EXT ?= .caption
TAG_EXT     ?= .txt
TAG_FLAGS   ?= --thresh 0.35 --batch_size 4
CAPTION_FLAGS ?= --beam_search --num_beams 1 --batch_size 4
TE_FLAGS    ?=
TRAIN_FLAGS ?=
LINT_FLAGS  ?=
REG         ?=
DATASET_CONFIG ?=
DATASET_FLAGS ?=
QUIET       ?=
OVERWRITE   ?=

CARGO_PROFILE_FLAG := $(if $(filter release,$(PROFILE)),--release,)
SIDECAR_FLAGS := $(if $(OVERWRITE),--overwrite,)
BUCKET_RANGE := --min_bucket_reso $(MIN_BUCKET) --max_bucket_reso $(MAX_BUCKET) --bucket_reso_steps $(BUCKET_STEP)

.PHONY: all build test fuzz setup setup-onnxruntime demo lora dataset lint tags captions metadata latents te-cache train samples bench clean-out FORCE

all: build

# SKIP_BUILD=1 uses the tools already in $(BIN) (the end-to-end tests do).
build:
	$(if $(SKIP_BUILD),@true,$(CARGO) build --workspace --bins $(CARGO_PROFILE_FLAG))

# Benchmarks of every stage (release build), one markdown table -> bench/results/latest.md.
bench:
	QUICK=$(QUICK) BIN_DIR=$(BIN_DIR) bench/all.sh

# ONNX Runtime shared library for tag-images, from the PyPI wheel into .local/onnxruntime/
# (no root, no system package), and the web-ui browser test's Chromium (Debian package) and
# playwright-core (npm, into .local/playwright/); each a no-op once installed.
setup: setup-onnxruntime
	@scripts/setup-browser.sh

# The ONNX Runtime library alone (what the demo and the tag stage need).
setup-onnxruntime:
	@scripts/setup-onnxruntime.sh

test: setup
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace

FUZZ_CASES ?= 500
FUZZ_SEED  ?= $(shell date +%s)
fuzz: setup-onnxruntime
	$(CARGO) build --workspace --bins
	LORAKIT_FUZZ_CASES=$(FUZZ_CASES) LORAKIT_FUZZ_SEED=$(FUZZ_SEED) \
	  $(CARGO) test -p lorakit-tests --test e2e fuzz:: -- --nocapture

# The demo copies the bundled example into $(OUT)/dataset so the repository stays untouched.
demo: setup-onnxruntime build
	@if [ ! -d "$(OUT)/dataset" ]; then mkdir -p "$(OUT)/dataset" && cp "$(EXAMPLE)"/*.png "$(EXAMPLE)"/*.caption "$(OUT)/dataset/"; fi
	@$(MAKE) -f $(firstword $(MAKEFILE_LIST)) --no-print-directory lora OUT="$(OUT)" DATA="$(OUT)/dataset"
	@echo
	@echo "demo finished:"
	@echo "  LoRA:        $(OUT)/lora/$(NAME).safetensors"
	@echo "  loss plot:   $(OUT)/lora/$(NAME)_loss.png (log: $(OUT)/lora/$(NAME)_loss.jsonl)"
	@echo "  lint report: $(OUT)/lint.json"
	@echo "  metadata:    $(OUT)/meta_lat.json (+ .manifest.json next to every output)"

lora: train

# Without MODEL= (TAGGER_DIR=, BLIP=) a stage would run the tiny test models from tests/fixtures
# on your images: only the demo's copy of the example (DATA=$(OUT)/dataset) may.
define need_model
	@if [ "$(origin $(1))" = "file" ] && [ "$(DATA)" != "$(OUT)/dataset" ]; then \
		echo "make: give $(1)=... for DATA=$(DATA): the default is a tiny test model from tests/fixtures, which only the demo uses" >&2; \
		exit 2; fi
endef

lint: $(OUT)/lint.json
$(OUT)/lint.json: FORCE | build
	@mkdir -p "$(OUT)"
	@"$(BIN)/lint-dataset" "$(DATA)" --resolution $(RES) $(BUCKET_RANGE) --train_batch_size $(BATCH) --json $(LINT_FLAGS) > "$@.partial"; code=$$?; \
		mv "$@.partial" "$@"; if [ $$code -ne 0 ] && [ $$code -ne 3 ]; then exit $$code; fi; \
		echo "lint-dataset: report in $@ (exit code $$code)"

# WD14 tags (.txt next to each image) from $(TAGGER_DIR)/<TAGGER with / as _>/ (model.onnx +
# selected_tags.csv, sd-scripts' layout).
tags: $(OUT)/.tags
$(OUT)/.tags: $(OUT)/lint.json FORCE | setup-onnxruntime
	$(call need_model,TAGGER_DIR)
	"$(BIN)/tag-images" "$(DATA)" --model_dir "$(TAGGER_DIR)" --repo_id "$(TAGGER)" \
		--caption_extension $(TAG_EXT) $(TAG_FLAGS) $(SIDECAR_FLAGS) $(QUIET)
	@touch "$@"

# BLIP captions (.caption next to each image) from a Hugging Face BLIP folder.
captions: $(OUT)/.captions
$(OUT)/.captions: $(OUT)/lint.json FORCE | build
	$(call need_model,BLIP)
	"$(BIN)/caption-images" "$(DATA)" --caption_weights "$(BLIP)" --caption_extension $(CAPTION_EXT) \
		--seed $(SEED) $(CAPTION_FLAGS) $(SIDECAR_FLAGS) $(QUIET)
	@touch "$@"

metadata: $(OUT)/meta_clean.json
$(OUT)/meta_cap.json: $(OUT)/.captions FORCE
	"$(BIN)/merge-captions" "$(DATA)" "$@" --full_path --caption_extension $(CAPTION_EXT) $(QUIET)
$(OUT)/meta_cap_dd.json: $(OUT)/meta_cap.json $(OUT)/.tags FORCE
	"$(BIN)/merge-tags" "$(DATA)" "$@" --in_json "$<" --full_path --caption_extension $(TAG_EXT) $(QUIET)
$(OUT)/meta_clean.json: $(OUT)/meta_cap_dd.json
	"$(BIN)/clean-captions" "$<" "$@" $(QUIET)

# A kohya layout (DATA with <repeats>_<name> folders, REG=, or DATASET_CONFIG=) is described by
# prepare-dataset instead of being tagged, captioned and merged.
KOHYA_LAYOUT := $(or $(REG),$(DATASET_CONFIG),$(wildcard $(DATA)/[0-9]*_*/))
LATENT_INPUT := $(if $(KOHYA_LAYOUT),$(OUT)/meta_dataset.json,$(OUT)/meta_clean.json)

latents: $(OUT)/meta_lat.json
$(OUT)/meta_lat.json: $(LATENT_INPUT) FORCE
	$(call need_model,MODEL)
	"$(BIN)/prepare-latents" "$(DATA)" "$<" "$@" "$(MODEL)" --max_resolution $(RES) $(BUCKET_RANGE) --batch_size 4 \
		--full_path --seed $(SEED) $(QUIET)

te-cache: $(OUT)/meta_lat_te_cache.json
$(OUT)/meta_lat_te_cache.json: $(OUT)/meta_lat.json FORCE
	$(call need_model,MODEL)
	"$(BIN)/cache-text-encoder" "$<" "$(MODEL)" --full_path $(TE_FLAGS) $(QUIET)

train: $(OUT)/lora/$(NAME).safetensors
$(OUT)/lora/$(NAME).safetensors: $(OUT)/meta_lat.json $(OUT)/meta_lat_te_cache.json FORCE
	$(call need_model,MODEL)
	"$(BIN)/train-lora" --pretrained_model_name_or_path "$(MODEL)" --in_json "$<" \
		--output_dir "$(OUT)/lora" --output_name $(NAME) --network_dim $(DIM) --network_alpha $(ALPHA) \
		--learning_rate $(LR) --max_train_steps $(STEPS) --train_batch_size $(BATCH) --seed $(SEED) \
		--network_train_unet_only $(TRAIN_FLAGS) $(QUIET)

# Sample images of a finished LoRA (generate-images): PROMPTS=prompts.txt|.toml|.json, the LoRA
# $(OUT)/lora/$(NAME).safetensors (or LORA=...), images in $(OUT)/samples; SAMPLE_FLAGS adds flags.
PROMPTS      ?=
LORA         ?= $(OUT)/lora/$(NAME).safetensors
SAMPLE_FLAGS ?= --sampler euler_a --steps 20 --scale 7
samples: | build
	$(if $(PROMPTS),,$(error PROMPTS=prompt file is required))
	"$(BIN)/generate-images" --ckpt "$(MODEL)" --from_file "$(PROMPTS)" --outdir "$(OUT)/samples" \
		--network_weights "$(LORA)" --seed $(SEED) $(SAMPLE_FLAGS) $(QUIET)

# A kohya layout described as one metadata JSON: DATA with <repeats>_<name> folders (REG for
# regularisation images), or DATASET_CONFIG=x.toml; `lora` uses it for such a DATA.
dataset: $(OUT)/meta_dataset.json
$(OUT)/meta_dataset.json: FORCE | build
	@mkdir -p "$(OUT)"
	"$(BIN)/prepare-dataset" $(if $(DATASET_CONFIG),--dataset_config "$(DATASET_CONFIG)",--train_data_dir "$(DATA)") \
		$(if $(REG),--reg_data_dir "$(REG)",) \
		--caption_extension $(CAPTION_EXT) --resolution $(RES) --enable_bucket $(BUCKET_RANGE) \
		--train_batch_size $(BATCH) $(DATASET_FLAGS) --out_json "$@" $(QUIET)

clean-out:
	rm -rf "$(OUT)"

FORCE:
