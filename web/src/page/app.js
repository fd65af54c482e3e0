// The lorakit page: plain DOM code, no framework. Every request that changes something carries
// the access token in the X-Lorakit-Token header (the server refuses it otherwise).
"use strict";

const TOKEN = document.querySelector('meta[name="lorakit-token"]').content;
const $ = (id) => document.getElementById(id);

// Hyper-parameter presets; folders stay as typed.
const PRESETS = {
  "SD1.5 LoRA, AdamW, rank 8": {
    network_module: "networks.lora", network_dim: "8", network_alpha: "1", optimizer_type: "AdamW",
    learning_rate: "1e-4", lr_scheduler: "cosine", train_batch_size: "1", max_train_epochs: "10",
    max_train_steps: "", resolution: "512,512", mixed_precision: "bf16",
  },
  "SD1.5 LoRA, Prodigy": {
    network_module: "networks.lora", network_dim: "16", network_alpha: "16", optimizer_type: "Prodigy",
    learning_rate: "1", lr_scheduler: "constant", train_batch_size: "1", max_train_epochs: "10",
    max_train_steps: "", resolution: "512,512",
  },
  "LyCORIS LoCon, rank 8": {
    network_module: "lycoris.kohya", network_dim: "8", network_alpha: "4",
    network_args: "algo=locon conv_dim=4 conv_alpha=1", optimizer_type: "AdamW", learning_rate: "1e-4",
  },
  "Quick check (4 steps, 256²)": {
    network_module: "networks.lora", network_dim: "4", network_alpha: "1", optimizer_type: "AdamW",
    learning_rate: "1e-4", lr_scheduler: "constant", max_train_steps: "4", max_train_epochs: "",
    train_batch_size: "2", resolution: "256,256", network_train_unet_only: true, mixed_precision: "no",
  },
};

async function api(method, url, body) {
  const options = { method, headers: { "X-Lorakit-Token": TOKEN } };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(url, options);
  const text = await response.text();
  if (!response.ok) throw new Error(text || response.statusText);
  return text ? JSON.parse(text) : null;
}

const fileUrl = (path) => "/api/file?path=" + encodeURIComponent(path) + "&t=" + Date.now();

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function say(id, text, bad = false) {
  $(id).textContent = text;
  $(id).classList.toggle("bad", bad);
}

function showTab(name) {
  for (const section of document.querySelectorAll(".tab")) {
    section.classList.toggle("hidden", section.id !== "tab-" + name);
  }
  for (const button of document.querySelectorAll("nav button")) {
    button.classList.toggle("active", button.dataset.tab === name);
  }
}

// ---- dataset ----

async function browse(path) {
  const url = "/api/browse" + (path ? "?path=" + encodeURIComponent(path) : "");
  const listing = await api("GET", url);
  const box = $("browser");
  box.replaceChildren();
  if (listing.parent) box.append(el("a", { href: "#", text: "..", onclick: () => browse(listing.parent) }));
  for (const folder of listing.folders) {
    box.append(el("a", { href: "#", text: folder, onclick: () => { $("dataset-dir").value = folder; browse(folder); } }));
  }
  for (const file of listing.files.filter((f) => f.endsWith(".json"))) {
    box.append(el("a", { href: "#", class: "file", text: file, onclick: () => { $("dataset-json").value = file; } }));
  }
}

async function loadDataset() {
  const query = new URLSearchParams({
    dir: $("dataset-dir").value.trim(),
    caption_extension: $("dataset-caption-ext").value.trim(),
    resolution: $("dataset-resolution").value.trim(),
    train_batch_size: $("dataset-batch").value.trim(),
  });
  if ($("dataset-json").value.trim()) query.set("json", $("dataset-json").value.trim());
  say("dataset-message", "linting...");
  let view;
  try {
    view = await api("GET", "/api/dataset?" + query);
  } catch (error) {
    say("dataset-message", error.message, true);
    return;
  }
  const lint = view.lint;
  say("dataset-message", `${view.images.length} images (${view.layout} layout)`);
  $("lint-summary").replaceChildren(el("p", {
    id: "lint-counts",
    text: `${lint.images} images checked: ${lint.counts.errors} errors, ${lint.counts.warnings} warnings, ${lint.counts.infos} notes`,
  }));
  $("findings").replaceChildren(...lint.findings.map((f) =>
    el("li", { class: f.severity }, el("b", { text: `${f.severity} ${f.code}` }), ` ${f.path}: ${f.message}`)));
  const most = Math.max(1, ...lint.bucket_occupancy.map((b) => b.images));
  $("buckets").replaceChildren(...lint.bucket_occupancy.map((b) =>
    el("div", { class: "bar-row" },
      el("span", { class: "bar-label", text: `${b.width}×${b.height}` }),
      el("span", { class: "bar", style: `width:${(200 * b.images) / most}px` }),
      ` ${b.images}`)));
  // Caption tags per folder (sd-scripts' ss_tag_frequency), then the tag files' counts.
  const tags = [];
  for (const [folder, counts] of Object.entries(view.caption_tags)) {
    const sorted = Object.entries(counts).sort((a, b) => b[1] - a[1]).slice(0, 40);
    tags.push(el("div", { class: "tag-folder", text: `captions in ${folder}:` }),
      ...sorted.map(([tag, count]) => el("span", { class: "tag", text: `${tag} (${count})` })));
  }
  if (lint.tag_frequency.length) tags.push(el("div", { class: "tag-folder", text: "tag files:" }));
  tags.push(...lint.tag_frequency.slice(0, 40).map((t) => el("span", { class: "tag", text: `${t.tag} (${t.count})` })));
  $("tags").replaceChildren(...tags);
  $("grid").replaceChildren(...view.images.map((image) => imageCard(image, view.layout)));
}

function imageCard(image, layout) {
  const text = el("textarea", { rows: 3 });
  text.value = image.caption;
  const status = el("span", { class: "message" });
  const save = el("button", {
    type: "button",
    text: "Save caption",
    onclick: async () => {
      try {
        await api("POST", "/api/caption", {
          path: image.caption_file, text: text.value, caption_extension: $("dataset-caption-ext").value.trim(),
        });
        status.textContent = "saved";
      } catch (error) {
        status.textContent = error.message;
      }
    },
  });
  const label = image.subset ? `${image.name} (×${image.repeats})` : image.name;
  const card = el("div", { class: "card" }, el("img", { src: fileUrl(image.path), alt: image.name, loading: "lazy" }),
    el("div", { class: "name", text: label }), text);
  // With a metadata JSON the caption shown is the metadata's; edits go to caption files only.
  if (layout !== "metadata") card.append(save, status);
  return card;
}

// ---- training form ----

function formOptions() {
  const options = {};
  for (const field of $("train-form").elements) {
    if (!field.name || field.name === "extra") continue;
    options[field.name] = field.type === "checkbox" ? String(field.checked) : field.value;
  }
  for (const line of $("train-form").elements.extra.value.split("\n")) {
    const at = line.indexOf("=");
    if (at > 0) options[line.slice(0, at).trim()] = line.slice(at + 1).trim();
  }
  return options;
}

function applyPreset() {
  const preset = PRESETS[$("preset").value] || {};
  for (const [name, value] of Object.entries(preset)) {
    const field = $("train-form").elements[name];
    if (!field) continue;
    if (field.type === "checkbox") field.checked = Boolean(value);
    else field.value = value;
  }
}

async function saveConfig() {
  try {
    const saved = await api("POST", "/api/config", { options: formOptions(), config: $("config-path").value.trim() });
    say("run-message", "wrote " + saved.config);
    $("config-text").textContent = saved.toml;
  } catch (error) {
    say("run-message", error.message, true);
  }
}

async function runAction(path, body) {
  try {
    const answer = await api("POST", path, body);
    say("run-message", answer.config ? "running from " + answer.config : "stopping: the run saves a resumable state");
    if (answer.config) showTab("live");
  } catch (error) {
    say("run-message", error.message, true);
  }
}

// ---- live view ----

function drawLoss(points) {
  const svg = $("loss-chart");
  const [width, height, pad] = [520, 220, 36];
  svg.replaceChildren();
  svg.dataset.points = String(points.length);
  const ns = "http://www.w3.org/2000/svg";
  const line = (x1, y1, x2, y2) => {
    const l = document.createElementNS(ns, "line");
    Object.entries({ x1, y1, x2, y2, class: "axis" }).forEach(([k, v]) => l.setAttribute(k, v));
    svg.append(l);
  };
  const label = (x, y, text) => {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x); t.setAttribute("y", y); t.textContent = text;
    svg.append(t);
  };
  line(pad, height - pad, width - 8, height - pad);
  line(pad, 8, pad, height - pad);
  if (points.length === 0) return;
  const steps = points.map((p) => p[0]);
  const losses = points.map((p) => p[1]);
  const [s0, s1] = [Math.min(...steps), Math.max(...steps)];
  const [l0, l1] = [Math.min(...losses), Math.max(...losses)];
  const x = (s) => pad + ((s - s0) / Math.max(1, s1 - s0)) * (width - pad - 8);
  const y = (l) => height - pad - ((l - l0) / Math.max(1e-12, l1 - l0)) * (height - pad - 8);
  const path = document.createElementNS(ns, "polyline");
  path.setAttribute("points", points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" "));
  path.setAttribute("class", "loss");
  svg.append(path);
  for (const p of points) {
    const dot = document.createElementNS(ns, "circle");
    dot.setAttribute("cx", x(p[0])); dot.setAttribute("cy", y(p[1])); dot.setAttribute("r", 2.5);
    svg.append(dot);
  }
  label(2, 14, l1.toPrecision(3));
  label(2, height - pad, l0.toPrecision(3));
  label(pad, height - 12, `step ${s0}`);
  label(width - 70, height - 12, `step ${s1}`);
}

function showLive(live) {
  const state = live.running ? "running"
    : live.exit_code === null ? "no run"
    : live.exit_code === 0 ? "finished"
    : live.exit_code === 130 ? "stopped (resumable: press Resume)"
    : `failed (exit code ${live.exit_code})`;
  $("run-state").textContent = state;
  const p = live.progress;
  $("stage").textContent = p ? p.label : (live.running ? "starting" : "-");
  $("step").textContent = p ? `${p.done}/${p.total}` + (p.status ? ` (${p.status})` : "") : "-";
  $("rate").textContent = p ? p.rate : "-";
  $("eta").textContent = p ? `${p.eta_seconds} s` : "-";
  drawLoss(live.losses);
  $("samples").replaceChildren(...live.samples.slice(-8).map((s) => el("img", { src: fileUrl(s), alt: s })));
  const sheet = $("contact-sheet");
  sheet.classList.toggle("hidden", !live.contact_sheet);
  if (live.contact_sheet && sheet.dataset.path !== live.contact_sheet + live.samples.length) {
    sheet.dataset.path = live.contact_sheet + live.samples.length;
    sheet.src = fileUrl(live.contact_sheet);
  }
  $("run-log").textContent = live.log.join("\n");
  if (!live.running && live.exit_code !== null && live.output_dir) {
    if (!$("history-dir").value) $("history-dir").value = live.output_dir;
    if ($("history-dir").value === live.output_dir && $("run-log").dataset.done !== String(live.started)) {
      $("run-log").dataset.done = String(live.started);
      loadHistory();
    }
  }
}

function follow() {
  const source = new EventSource("/api/events");
  source.onmessage = (event) => showLive(JSON.parse(event.data));
}

// ---- history ----

async function loadHistory() {
  let found;
  try {
    found = await api("GET", "/api/history?path=" + encodeURIComponent($("history-dir").value.trim()));
  } catch (error) {
    say("history-message", error.message, true);
    return;
  }
  say("history-message", `${found.loras.length} LoRA files, ${found.states.length} resumable states`);
  const keys = ["ss_network_dim", "ss_network_alpha", "ss_steps", "ss_learning_rate", "ss_optimizer"];
  const head = el("tr", {}, el("th", { text: "" }), el("th", { text: "file" }),
    ...keys.map((k) => el("th", { text: k.slice(3) })), el("th", { text: "" }));
  const rows = found.loras.map((lora) => {
    const rank = el("input", { size: 3, value: "2", title: "new rank" });
    const actions = el("td", {},
      el("button", { type: "button", text: "Check", onclick: () => loraAction("/api/lora/check", { path: lora.path }) }),
      el("button", { type: "button", text: "Resize to", onclick: () => loraAction("/api/lora/resize", { path: lora.path, new_rank: Number(rank.value) }) }),
      rank);
    if (lora.loss_plot) actions.append(el("a", { href: fileUrl(lora.loss_plot), target: "_blank", text: " loss plot" }));
    return el("tr", { class: "lora" },
      el("td", {}, el("input", { type: "checkbox", class: "merge-pick", value: lora.path })),
      el("td", { class: "lora-name", text: lora.path.split("/").pop() }),
      ...keys.map((k) => el("td", { text: lora.metadata[k] ?? "" })),
      actions);
  });
  $("loras").replaceChildren(head, ...rows);
  const media = [];
  for (const lora of found.loras) if (lora.loss_plot) media.push(el("img", { src: fileUrl(lora.loss_plot), alt: "loss plot" }));
  if (found.contact_sheet) media.push(el("img", { src: fileUrl(found.contact_sheet), alt: "contact sheet" }));
  $("history-media").replaceChildren(...media);
}

async function loraAction(path, body) {
  try {
    const answer = await api("POST", path, body);
    $("lora-report").textContent = JSON.stringify(answer, null, 2);
    if (answer.written) loadHistory();
  } catch (error) {
    $("lora-report").textContent = error.message;
  }
}

async function merge() {
  const paths = [...document.querySelectorAll(".merge-pick:checked")].map((c) => c.value);
  await loraAction("/api/lora/merge", { paths, ratios: paths.map(() => 1), save_to: $("merge-to").value.trim() });
}

// ---- start ----

async function init() {
  for (const button of document.querySelectorAll("nav button")) {
    button.addEventListener("click", () => showTab(button.dataset.tab));
  }
  for (const name of Object.keys(PRESETS)) $("preset").append(el("option", { text: name, value: name }));
  $("browse-dataset").onclick = () => browse($("dataset-dir").value.trim());
  $("load-dataset").onclick = loadDataset;
  $("apply-preset").onclick = applyPreset;
  $("save-config").onclick = saveConfig;
  $("start").onclick = () => runAction("/api/run/start", { options: formOptions() });
  $("stop").onclick = () => runAction("/api/run/stop");
  $("resume").onclick = () => runAction("/api/run/resume");
  $("load-history").onclick = loadHistory;
  $("merge").onclick = merge;
  const roots = await api("GET", "/api/browse");
  $("folders").textContent = "folders: " + roots.folders.join(", ");
  if (!$("dataset-dir").value) $("dataset-dir").value = roots.folders[0] || "";
  follow();
}

init();
