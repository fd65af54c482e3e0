# lorakit: dataset-to-LoRA build.
#
#   make demo                 run the whole flow on the bundled example (examples/tiny-dataset)
#   make test                 build everything and run all tests
#   make DATA=dir OUT=dir metadata   merge captions + tags and clean them for your folder
#   make DATA=dir BLIP=folder captions   BLIP captions (<stem>.caption) for your folder
#
# Stage targets depend on the manifests the tools write (`<output>.manifest.json`), never on
# one rule per image: the tools themselves decide per item what is up to date.

SHELL      := /bin/bash
CARGO      ?= cargo
PROFILE    ?= debug
BIN        := target/$(PROFILE)
DATA       ?= $(OUT)/dataset
OUT        ?= out/demo
EXAMPLE    := examples/tiny-dataset
FULL_PATH  ?= --full_path
CAPTION_EXT ?= .caption
TAG_EXT    ?= .txt

CARGO_PROFILE_FLAG := $(if $(filter release,$(PROFILE)),--release,)

.PHONY: all build test demo metadata clean-out setup

all: build

build:
	$(CARGO) build --workspace --bins $(CARGO_PROFILE_FLAG)

test: setup
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace

# The demo copies the bundled example into $(OUT)/dataset so the repository stays untouched.
demo: setup build
	@mkdir -p "$(OUT)"
	@if [ ! -d "$(OUT)/dataset" ]; then mkdir -p "$(OUT)/dataset" && cp "$(EXAMPLE)"/* "$(OUT)/dataset/"; fi
	$(MAKE) --no-print-directory metadata DATA="$(OUT)/dataset" OUT="$(OUT)"
	@echo
	@echo "demo finished: metadata in $(OUT)/meta_clean.json (manifest: $(OUT)/meta_clean.json.manifest.json)"

metadata: $(OUT)/meta_clean.json

$(OUT)/meta_cap.json: build
	@mkdir -p "$(OUT)"
	"$(BIN)/merge-captions" "$(DATA)" "$@" $(FULL_PATH) --caption_extension $(CAPTION_EXT)

$(OUT)/meta_cap_dd.json: $(OUT)/meta_cap.json
	"$(BIN)/merge-tags" "$(DATA)" "$@" --in_json "$<" $(FULL_PATH) --caption_extension $(TAG_EXT)

$(OUT)/meta_clean.json: $(OUT)/meta_cap_dd.json
	"$(BIN)/clean-captions" "$<" "$@"

clean-out:
	rm -rf "$(OUT)"

# ONNX Runtime shared library for tag-images, from the PyPI wheel into .local/onnxruntime/
# (no root, no system package; a no-op once installed).
setup:
	@scripts/setup-onnxruntime.sh

# WD14 tags (.txt next to each image) with the model in $(WD14_MODEL_DIR)/<owner>_<repo>/
# (model.onnx + selected_tags.csv, as sd-scripts lays it out). WD14_MODEL=folder installs that
# folder there first, e.g. WD14_MODEL=tests/fixtures/wd14-tiny (random weights: meaningless
# tags, real code path).
WD14_MODEL_DIR ?= wd14_tagger_model
WD14_REPO_ID   ?= SmilingWolf/wd-v1-4-convnext-tagger-v2
WD14_MODEL     ?=
TAG_FLAGS      ?= --thresh 0.35 --batch_size 8
.PHONY: tags
tags: setup build
	@if [ -n "$(WD14_MODEL)" ] && [ ! -d "$(WD14_MODEL_DIR)/$(subst /,_,$(WD14_REPO_ID))" ]; then \
		mkdir -p "$(WD14_MODEL_DIR)/$(subst /,_,$(WD14_REPO_ID))" && \
		cp "$(WD14_MODEL)"/model.onnx "$(WD14_MODEL)"/selected_tags.csv "$(WD14_MODEL_DIR)/$(subst /,_,$(WD14_REPO_ID))/"; fi
	"$(BIN)/tag-images" "$(DATA)" --model_dir "$(WD14_MODEL_DIR)" --repo_id "$(WD14_REPO_ID)" \
		--caption_extension $(TAG_EXT) $(TAG_FLAGS)

# Text-encoder output cache of the cleaned metadata (tiny fixture model unless MODEL is given).
MODEL      ?= tests/fixtures/sd15-tiny/model.safetensors
TE_FLAGS   ?=
.PHONY: te-cache
te-cache: $(OUT)/meta_clean_te_cache.json

$(OUT)/meta_clean_te_cache.json: $(OUT)/meta_clean.json
	"$(BIN)/cache-text-encoder" "$<" "$(MODEL)" --train_data_dir "$(DATA)" $(TE_FLAGS)
# BLIP captions: the tool itself skips images whose caption is up to date (content keys in
# $(DATA)/caption-images$(CAPTION_EXT).json.manifest.json), so it can run every time.
BLIP          ?= models/blip-image-captioning-large
CAPTION_FLAGS ?= --beam_search --num_beams 1
.PHONY: captions
captions: build
	"$(BIN)/caption-images" "$(DATA)" --caption_weights "$(BLIP)" --caption_extension $(CAPTION_EXT) $(CAPTION_FLAGS)

# Dataset check before any expensive stage (exit code 3 when errors are found).
LINT_FLAGS ?=
.PHONY: lint
lint: build
	"$(BIN)/lint-dataset" "$(DATA)" $(LINT_FLAGS)
