#!/usr/bin/env bash
# Runs the kohya-ss sd-scripts side of the stage benchmarks on the same inputs as our bench/*.sh
# scripts, right after ours, and prints wall seconds, CPU seconds (user+sys) and peak RSS per stage.
# Installs nothing: point it at your own sd-scripts checkout and the Python that runs it (with
# sd-scripts' requirements plus onnx and onnxruntime for the tagger).
#
#   SD_SCRIPTS=~/sd-scripts SD_PYTHON=~/sd-scripts/venv/bin/python bench/compare-sd-scripts.sh [STAGE...]
#
# Stages (default: tag, caption, metadata, text-encoder): tag, caption, metadata, text-encoder,
# train, lora-tools.
#   tag           bench/tag-images.sh on 20 and 2,000 copies of the fixture photos (tiny WD14 tagger,
#                 batch 8), then sd-scripts finetune/tag_images_by_wd14_tagger.py --onnx on the same
#                 folders, and the ONNX session alone on batches of the same shape (the floor).
#   caption       caption-images on the 12 fixture photos with the tiny BLIP (greedy and 3 beams,
#                 max_length 75, min_length 5, batch 1), then the reference: transformers'
#                 BlipForConditionalGeneration.generate with the same settings (sd-scripts'
#                 make_captions.py needs its own checkpoint format, so the Hugging Face model that
#                 blip-tiny is stored as stands in for it).
#   metadata      bench/metadata.sh on N_META (100,000) caption/tag pairs, then
#                 merge_captions_to_metadata.py, merge_dd_tags_to_metadata.py and
#                 clean_captions_and_tags.py on the same folder; the JSON files are compared too.
#   text-encoder  bench/cache-text-encoder.sh (tiny: N_TINY captions, CLIP-L shape: N_FULL), then
#                 transformers' CLIPTextModel on the same captions and weights, batch by batch as
#                 train_network.py encodes them when the text-encoder output is not cached.
#   train         the tiny SD1 fixture on 8 fixture photos in a DreamBooth folder (1_sks photo),
#                 256-px buckets, batch 2, rank 8 / alpha 4, AdamW, TRAIN_STEPS (20) steps, 1 thread,
#                 TRAIN_NETS (default "lierla c3lier te"): LierLa and C3Lier (conv_dim=2
#                 conv_alpha=0.5) UNet-only, and "te": LierLa on the UNet and the text encoder
#                 (--unet_lr 1e-4 --text_encoder_lr 5e-5, captions encoded live on both sides);
#                 our prepare-latents, cache-text-encoder and train-lora, then train_network.py
#                 with the same settings (bench/sd_scripts_train.py; it caches the latents in
#                 memory within its run). TRAIN_MODEL (a single-file SD1 checkpoint with a
#                 tokenizer/ folder beside it, e.g. bench/torch_generate_full.py's full-size one),
#                 TRAIN_RES (256), TRAIN_IMAGES (8), TRAIN_BATCH (2) and TRAIN_THREADS (1) change
#                 the run (with TRAIN_MODEL, sd-scripts loads it without the tiny-width patch).
#   lora-tools    a full-size SD1.5 LierLa LoRA at rank 128 (bench/sd_scripts_full_lora.py:
#                 sd-scripts' networks.lora on its SD1.5 UNet and CLIP ViT-L/14 shapes, 264
#                 modules, random float16 factors) resized by our resize-lora and by sd-scripts'
#                 networks/resize_lora.py (--device cpu), --save_precision fp16: to rank 32, and
#                 dynamically (--dynamic_method sv_fro --dynamic_param 0.9); the ranks each chose
#                 and the resized modules' products are compared.
# Wall times include process start-up and model loading on both sides.
# Environment: WORK (scratch folder, default a new temp folder), PROFILE (release), TAG_SIZES
# ("20 2000"), N_META (100000), N_TINY (512), N_FULL (64).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${SD_SCRIPTS:?set SD_SCRIPTS to an sd-scripts checkout}"
: "${SD_PYTHON:?set SD_PYTHON to the python that runs sd-scripts}"
SD_SCRIPTS=$(cd "$SD_SCRIPTS" && pwd)
[ -f "$SD_SCRIPTS/finetune/tag_images_by_wd14_tagger.py" ] || {
  echo "error: $SD_SCRIPTS is not an sd-scripts checkout (no finetune/tag_images_by_wd14_tagger.py)" >&2
  exit 2
}
STAGES=("$@")
[ ${#STAGES[@]} -gt 0 ] || STAGES=(tag caption metadata text-encoder)
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
PROFILE=${PROFILE:-release}
export PROFILE
BIN=${CARGO_TARGET_DIR:-target}/$PROFILE
FIX=$(pwd)/tests/fixtures
echo "sd-scripts comparison, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), work folder $WORK"
echo "sd-scripts: $SD_SCRIPTS; $("$SD_PYTHON" --version 2>&1)"

# measure LABEL ITEMS COMMAND...: runs COMMAND (output to $WORK/LABEL.out) under /usr/bin/time
# and prints wall seconds, items/s, CPU seconds and peak RSS.
measure() {
  local label=$1 items=$2; shift 2
  local log="$WORK/${label// /_}.time"
  if ! /usr/bin/time -f "%e %U %S %M" -o "$log" "$@" > "$WORK/${label// /_}.out" 2>&1; then
    echo "$label: FAILED (see $WORK/${label// /_}.out)"
    return 0
  fi
  read -r wall user sys rss < <(tail -n 1 "$log")
  awk -v l="$label" -v n="$items" -v w="$wall" -v c="$(echo "$user + $sys" | bc)" -v r="$rss" \
    'BEGIN { printf "%-34s %7d items %8.2f s wall %9.1f items/s %8.2f s CPU %7.0f MiB peak RSS\n",
      l, n, w, n / (w > 0 ? w : 1e-9), c, r / 1024 }'
}

# SD_PYTHON in the sd-scripts checkout, with it on the module path (as its `pip install -e .` does).
SD_RUN=(env -C "$SD_SCRIPTS" "PYTHONPATH=$SD_SCRIPTS${PYTHONPATH:+:$PYTHONPATH}" "$SD_PYTHON")

stage_tag() {
  local work="$WORK/tag" batch=8 sizes
  read -r -a sizes <<< "${TAG_SIZES:-20 2000}"
  WORK="$work" BATCH=$batch bench/tag-images.sh "${sizes[@]}"
  local models="$work/models"
  for n in "${sizes[@]}"; do
    # --character_threshold 1.01 as in the fixture goldens: sd-scripts at 48d368f crashes in the
    # default output path as soon as a character tag passes its threshold.
    measure "sd-scripts wd14 tagger (batch $batch)" "$n" "${SD_RUN[@]}" finetune/tag_images_by_wd14_tagger.py \
      "$work/data-$n" --onnx --model_dir "$models" --batch_size "$batch" --thresh 0.35 \
      --character_threshold 1.01
    "$SD_PYTHON" - "$models/SmilingWolf_wd-v1-4-convnext-tagger-v2/model.onnx" "$n" "$batch" <<'PY'
# The floor: onnxruntime's session.run alone on batches of the tagger's input shape.
import sys, time
import numpy as np
import onnxruntime as ort
path, n, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
side = session.get_inputs()[0].shape[1]
total = 0.0
for start in range(0, n, batch):
    images = np.zeros((min(batch, n - start), side, side, 3), np.float32)
    began = time.perf_counter()
    session.run(None, {name: images})
    total += time.perf_counter() - began
print(f"onnxruntime session.run only       {n:7d} items {total:8.2f} s ({n / total:.1f} items/s, batch {batch})")
PY
  done
}

stage_caption() {
  local work="$WORK/caption"
  rm -rf "$work" && mkdir -p "$work/data"
  cp "$FIX"/images/*.png "$FIX"/images/*.jpg "$work/data/"
  local n
  n=$(find "$work/data" -maxdepth 1 -name '*.png' -o -maxdepth 1 -name '*.jpg' | wc -l)
  cargo build -q -p caption-images $([ "$PROFILE" = release ] && echo --release)
  cat > "$work/blip_generate.py" <<'PY'
# Captions a folder with transformers' BlipForConditionalGeneration the way sd-scripts'
# make_captions.py drives its BLIP: prompt "a picture of ", batch 1, caption = text after it.
import os, sys, time
started = time.perf_counter()
import torch
from PIL import Image
from transformers import BlipForConditionalGeneration, BlipProcessor
model_dir, folder, beams = sys.argv[1], sys.argv[2], int(sys.argv[3])
processor = BlipProcessor.from_pretrained(model_dir)
model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()
loaded = time.perf_counter()
prompt = "a picture of "
files = sorted(f for f in os.listdir(folder) if f.lower().endswith((".png", ".jpg")))
with torch.no_grad():
    for name in files:
        image = Image.open(os.path.join(folder, name)).convert("RGB")
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        ids = model.generate(**inputs, num_beams=beams, do_sample=False, max_length=75, min_length=5)
        text = processor.decode(ids[0], skip_special_tokens=True)[len(prompt):]
        stem = os.path.splitext(name)[0]
        with open(os.path.join(folder, f"{stem}.hf-{beams}.caption"), "w") as out:
            out.write(text + "\n")
done = time.perf_counter()
print(f"imports+load {loaded - started:.2f} s, generate {done - loaded:.2f} s for {len(files)} images")
PY
  for beams in 1 3; do
    measure "caption-images (beams $beams)" "$n" "$BIN/caption-images" "$work/data" \
      --caption_weights "$FIX/blip-tiny" --beam_search --num_beams "$beams" --max_length 75 \
      --min_length 5 --batch_size 1 --caption_extension ".ours-$beams.caption" --force -q
    measure "transformers BLIP generate (beams $beams)" "$n" \
      "${SD_RUN[@]}" "$work/blip_generate.py" "$FIX/blip-tiny" "$work/data" "$beams"
    sed 's/^/    /' "$WORK/transformers_BLIP_generate_(beams_$beams).out" | tail -n 1
    local same=0 stem
    for f in "$work"/data/*.ours-"$beams".caption; do
      stem=${f%.ours-"$beams".caption}
      cmp -s "$f" "$stem.hf-$beams.caption" && same=$((same + 1))
    done
    echo "    identical captions: $same of $n"
  done
}

stage_metadata() {
  local work="$WORK/metadata" n=${N_META:-100000}
  bench/metadata.sh "$n" "$work"
  local data="$work/data" sd="$work/sd-scripts"
  rm -rf "$sd" && mkdir -p "$sd"
  measure "sd-scripts merge_captions" "$n" "${SD_RUN[@]}" finetune/merge_captions_to_metadata.py \
    "$data" "$sd/meta_cap.json" --full_path
  measure "sd-scripts merge_dd_tags" "$n" "${SD_RUN[@]}" finetune/merge_dd_tags_to_metadata.py \
    "$data" "$sd/meta_cap_dd.json" --in_json "$sd/meta_cap.json" --full_path
  measure "sd-scripts clean_captions_and_tags" "$n" "${SD_RUN[@]}" finetune/clean_captions_and_tags.py \
    "$sd/meta_cap_dd.json" "$sd/meta_clean.json"
  local f
  for f in meta_cap.json meta_cap_dd.json meta_clean.json; do
    if cmp -s "$work/$f" "$sd/$f"; then echo "    $f: byte-identical"; else echo "    $f: DIFFERS"; fi
  done
}

stage_text_encoder() {
  local work="$WORK/text-encoder" n_tiny=${N_TINY:-512} n_full=${N_FULL:-64}
  bench/cache-text-encoder.sh "$n_tiny" "$n_full" "$work"
  cat > "$work/clip_encode.py" <<'PY'
# Encodes the metadata captions with transformers' CLIPTextModel built from the weights' shapes,
# batch by batch (tokenise to 77 with EOS padding, last_hidden_state), as train_network.py does
# for SD1.x when text-encoder outputs are not cached.
import json, sys, time
started = time.perf_counter()
import torch
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
meta_path, weights, tokenizer_dir, batch, head_dim = sys.argv[1:6]
batch, head_dim = int(batch), int(head_dim)
prefix = "cond_stage_model.transformer."
state = {k[len(prefix):]: v for k, v in load_file(weights).items() if k.startswith(prefix)}
state.pop("text_model.embeddings.position_ids", None)
hidden = state["text_model.embeddings.token_embedding.weight"].shape[1]
layers = len({k.split(".")[3] for k in state if k.startswith("text_model.encoder.layers.")})
config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, num_hidden_layers=layers,
                        intermediate_size=state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                        num_attention_heads=hidden // head_dim, max_position_embeddings=77,
                        hidden_act="quick_gelu")
model = CLIPTextModel(config).eval()
model.load_state_dict(state)
tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
meta = json.load(open(meta_path))
captions = [", ".join(p for p in (e.get("caption"), e.get("tags")) if p) for e in meta.values()]
loaded = time.perf_counter()
tokenizing = encoding = 0.0
with torch.no_grad():
    for start in range(0, len(captions), batch):
        began = time.perf_counter()
        ids = tokenizer(captions[start:start + batch], padding="max_length", max_length=77,
                        truncation=True, return_tensors="pt").input_ids
        tokenized = time.perf_counter()
        model(ids).last_hidden_state
        tokenizing += tokenized - began
        encoding += time.perf_counter() - tokenized
print(f"imports+load {loaded - started:.2f} s, tokenize {tokenizing:.2f} s, encode {encoding:.2f} s "
      f"({len(captions) / (tokenizing + encoding):.1f} captions/s)")
PY
  local batch
  for batch in 1 8 32; do
    measure "transformers CLIP tiny (batch $batch)" "$n_tiny" "${SD_RUN[@]}" "$work/clip_encode.py" \
      "$work/meta_tiny.json" "$FIX/sd15-tiny/model.safetensors" "$FIX/sd15-tiny/tokenizer" "$batch" 16
    sed 's/^/    /' "$WORK/transformers_CLIP_tiny_(batch_$batch).out" | tail -n 1
  done
  for batch in 1 8 32; do
    measure "transformers CLIP-L (batch $batch)" "$n_full" "${SD_RUN[@]}" "$work/clip_encode.py" \
      "$work/meta_full.json" "$work/clip_l.safetensors" "$FIX/sd15-tiny/tokenizer" "$batch" 64
    sed 's/^/    /' "$WORK/transformers_CLIP-L_(batch_$batch).out" | tail -n 1
  done
}

stage_train() {
  local work="$WORK/train" steps=${TRAIN_STEPS:-20}
  local model=${TRAIN_MODEL:-$FIX/sd15-tiny/model.safetensors} res=${TRAIN_RES:-256}
  local images=${TRAIN_IMAGES:-8} batch=${TRAIN_BATCH:-2} threads=${TRAIN_THREADS:-1}
  local buckets=(--min_bucket_reso $((res / 2)) --max_bucket_reso $((res * 2)))
  rm -rf "$work" && mkdir -p "$work/img/1_sks photo" "$work/tokenizer_cache"
  local photo
  for photo in $(ls "$FIX"/images/*.png | head -n "$images"); do cp "$photo" "$work/img/1_sks photo/"; done
  cp -r "$FIX/sd15-tiny/tokenizer" "$work/tokenizer_cache/openai_clip-vit-large-patch14"
  cargo build -q -p prepare-dataset -p prepare-latents -p cache-text-encoder -p train-lora \
    $([ "$PROFILE" = release ] && echo --release)
  # Ours: describe the folder, cache latents and text states (each once), then train from caches.
  "$BIN/prepare-dataset" --train_data_dir "$work/img" --resolution "$res" --enable_bucket \
    "${buckets[@]}" --train_batch_size "$batch" --out_json "$work/meta.json" -q
  measure "lorakit prepare-latents" "$images" "$BIN/prepare-latents" "$work/img" "$work/meta.json" \
    "$work/meta_lat.json" "$model" --max_resolution "$res" "${buckets[@]}" \
    --full_path --batch_size 4
  measure "lorakit cache-text-encoder" "$images" "$BIN/cache-text-encoder" "$work/meta_lat.json" "$model" --full_path
  # The training settings both sides share (by default 8 photos, 256-px buckets, batch 2, AdamW,
  # 1 thread).
  local common=(--pretrained_model_name_or_path "$model" --network_module networks.lora
    --network_dim 8 --network_alpha 4 --optimizer_type AdamW --learning_rate 1e-4
    --max_train_steps "$steps" --train_batch_size "$batch" --seed 42 --mixed_precision no
    --save_precision float --save_model_as safetensors)
  local net label
  for net in ${TRAIN_NETS:-lierla c3lier te}; do
    local args=(--network_train_unet_only)
    [ "$net" = c3lier ] && args+=(--network_args conv_dim=2 conv_alpha=0.5)
    [ "$net" = te ] && args=(--unet_lr 1e-4 --text_encoder_lr 5e-5)
    label="lorakit train-lora $net ($steps steps)"
    measure "$label" "$steps" env RAYON_NUM_THREADS="$threads" "$BIN/train-lora" "${common[@]}" "${args[@]}" \
      --in_json "$work/meta_lat.json" --output_dir "$work/out-lorakit-$net" --output_name lora
    label="sd-scripts train_network $net ($steps steps)"
    measure "$label" "$steps" env OMP_NUM_THREADS="$threads" TORCH_THREADS="$threads" \
      LORAKIT_FULL_SIZE=$([ -n "${TRAIN_MODEL:-}" ] && echo 1 || echo 0) "${SD_RUN[@]}" "$(pwd)/bench/sd_scripts_train.py" \
      "$SD_SCRIPTS" "${common[@]}" "${args[@]}" --train_data_dir "$work/img" --resolution "$res" \
      --enable_bucket "${buckets[@]}" --cache_latents \
      --max_data_loader_n_workers 0 --tokenizer_cache_dir "$work/tokenizer_cache" \
      --output_dir "$work/out-sd-scripts-$net" --output_name lora
    grep "train seconds" "$WORK/${label// /_}.out" | sed 's/^/    /' || true
  done
}

stage_lora_tools() {
  local work="$WORK/lora-tools" input
  mkdir -p "$work"
  input="$work/full128.safetensors"
  [ -f "$input" ] || "${SD_RUN[@]}" "$(pwd)/bench/sd_scripts_full_lora.py" "$input" 128 > "$work/input.out" 2>&1
  [ -n "${NO_BUILD:-}" ] || cargo build -p resize-lora $([ "$PROFILE" = release ] && echo --release) -q
  local resize=(--model "$input" --save_precision fp16)
  local fixed=(--new_rank 32) dynamic=(--new_rank 128 --dynamic_method sv_fro --dynamic_param 0.9)
  measure "lorakit resize-lora 128 to 32" 264 "$BIN/resize-lora" "${resize[@]}" "${fixed[@]}" \
    --save_to "$work/lorakit-32.safetensors"
  measure "sd-scripts resize_lora.py 128 to 32" 264 "${SD_RUN[@]}" networks/resize_lora.py \
    "${resize[@]}" "${fixed[@]}" --device cpu --save_to "$work/sd-scripts-32.safetensors"
  measure "lorakit resize-lora sv_fro 0.9" 264 "$BIN/resize-lora" "${resize[@]}" "${dynamic[@]}" \
    --save_to "$work/lorakit-fro.safetensors"
  measure "sd-scripts resize_lora.py sv_fro 0.9" 264 "${SD_RUN[@]}" networks/resize_lora.py \
    "${resize[@]}" "${dynamic[@]}" --device cpu --save_to "$work/sd-scripts-fro.safetensors"
  "$SD_PYTHON" - "$work" <<'PY'
import sys
from safetensors.torch import load_file
work = sys.argv[1]
for case in ("32", "fro"):
    ours = load_file(f"{work}/lorakit-{case}.safetensors")
    theirs = load_file(f"{work}/sd-scripts-{case}.safetensors")
    names = sorted(k[: -len(".lora_down.weight")] for k in theirs if k.endswith(".lora_down.weight"))
    same_rank, worst = 0, 0.0
    for name in names:
        down, up = (f"{name}.lora_down.weight", f"{name}.lora_up.weight")
        same_rank += ours[down].shape[0] == theirs[down].shape[0]
        if ours[down].shape[0] != theirs[down].shape[0]:
            continue
        product = lambda sd: (sd[up].float().flatten(1) @ sd[down].float().flatten(1)) * (
            sd[f"{name}.alpha"].float() / sd[down].shape[0])
        a, b = product(ours), product(theirs)
        worst = max(worst, float((a - b).norm() / b.norm()))
    print(f"    {case}: ranks equal in {same_rank} of {len(names)} modules; "
          f"largest relative difference of up.down.scale: {worst:.2e}")
PY
}

for stage in "${STAGES[@]}"; do
  echo "== $stage"
  case "$stage" in
    tag) stage_tag ;;
    caption) stage_caption ;;
    metadata) stage_metadata ;;
    text-encoder) stage_text_encoder ;;
    train) stage_train ;;
    lora-tools) stage_lora_tools ;;
    *) echo "error: unknown stage $stage (tag, caption, metadata, text-encoder, train, lora-tools)" >&2; exit 2 ;;
  esac
done
