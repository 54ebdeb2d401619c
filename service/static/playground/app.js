// EqM playground: builds requests from the forms, follows the job's events, draws each image's descent.
// Plain JavaScript, no dependencies; everything it loads comes from this server, by paths relative to the
// page, so it works under a path prefix too.
"use strict";

const KEY_STORAGE = "eqm-api-key";
const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

// jobs and curls: the latest job and request of each tab (task); job: the one the results area shows.
const state = { model: null, ready: false, job: null, jobs: {}, curls: {}, upload: null };   // upload: {blob, name, fromFile}

// -- API access -------------------------------------------------------------------------------

function apiKey() { return sessionStorage.getItem(KEY_STORAGE) || ""; }

function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (apiKey()) headers.Authorization = "Bearer " + apiKey();
  return fetch(path, Object.assign({}, options, { headers }));
}

async function readError(resp) {
  const body = await resp.json().catch(() => null);
  if (body && typeof body.detail === "string") return { body, text: body.detail };
  if (body && body.message) return { body, text: body.message };
  return { body, text: `HTTP ${resp.status} ${resp.statusText}` };
}

// -- start-up: the model card (or the API key first) ------------------------------------------

async function start() {
  let resp;
  try {
    resp = await api("v1/models");
  } catch (err) {
    $("#model-info").textContent = "The server does not answer: " + err.message;
    return;
  }
  if (resp.status === 401) {
    showKeyPanel(apiKey() ? "The server refused this key; enter another one." : "");
    return;
  }
  if (!resp.ok) {
    $("#model-info").textContent = "GET /v1/models failed: " + (await readError(resp)).text;
    return;
  }
  const body = await resp.json();
  state.model = body.models[0];
  $("#key-panel").hidden = true;
  $("#key-change").hidden = !apiKey();
  if (!state.ready) { setupModel(state.model); state.ready = true; }
  $("#app").hidden = false;
}

function showKeyPanel(message) {
  $("#app").hidden = true;
  $("#key-panel").hidden = false;
  $("#key-error").textContent = message;
  $("#model-info").textContent = "This server needs an API key.";
  $("#api-key").focus();
}

$("#key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const key = $("#api-key").value.trim();
  if (!key) { $("#key-error").textContent = "Enter the key the server was started with (EQM_API_KEYS)."; return; }
  sessionStorage.setItem(KEY_STORAGE, key);
  $("#api-key").value = "";
  start();
});

$("#key-change").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_STORAGE);
  showKeyPanel("");
});

// -- the forms, shaped by the model ----------------------------------------------------------

function className(index) {
  const names = state.model.class_names;
  return names[index] !== undefined && names[index] !== "" ? names[index] : String(index);
}

function classOption(index) {
  const name = className(index);
  return name === String(index) ? name : `${index}: ${name}`;
}

// "207: golden retriever" or "207" -> 207; anything else goes to the server as a name.
function parseLabel(text) {
  const m = /^\s*(\d+)\s*(?::.*)?$/.exec(text);
  return m ? Number(m[1]) : text.trim();
}

function labelText(label) { return typeof label === "number" ? className(label) : String(label); }

function setupModel(m) {
  const kind = m.channels === 1 ? "grey" : "RGB";
  $("#model-info").textContent = `Model ${m.name} · ${m.arch} · ${m.image_size}×${m.image_size} ${kind} · ` +
    `${m.num_classes ? m.num_classes + " classes" : "unconditional"} · default sampler ${m.defaults.sampler}, ` +
    `${m.defaults.sampler === "heun-sde" ? "dt" : "η"} ${m.defaults.step_size}, ` +
    `up to ${m.defaults.max_steps} steps`;
  const list = $("#class-list");
  list.replaceChildren(...Array.from({ length: m.num_classes }, (_, i) => new Option(classOption(i), classOption(i))));
  const forms = { generate: $("#panel-generate"), compose: $("#panel-compose"), denoise: $("#panel-denoise"),
                  inpaint: $("#panel-inpaint") };
  const d = m.defaults;
  for (const [task, form] of Object.entries(forms)) {
    const opts = $("#options-template").content.cloneNode(true);
    for (const el of $$("[id]", opts)) el.id = el.id.replace(/^X-/, task + "-");
    for (const el of $$("label[for]", opts)) el.htmlFor = el.htmlFor.replace(/^X-/, task + "-");
    $("[data-options]", form).replaceWith(opts);
    const placeholders = {
      guidance_scale: task === "compose" ? d.composition_guidance_scale : d.guidance_scale,
      step_size: d.step_size, mu: d.mu, grad_norm_threshold: d.grad_norm_threshold,
      max_steps: task === "denoise" ? d.denoise_max_steps : d.max_steps,
    };
    for (const [name, value] of Object.entries(placeholders)) $(`[name=${name}]`, form).placeholder = String(value);
    $("[name=sampler] option[value='']", form).textContent = `default (${d.sampler})`;
    $("[name=n]", form).value = { generate: 4, compose: 2, denoise: 1, inpaint: 2 }[task];
    $("[name=n]", form).max = m.limits.max_images_per_job;
    // A new image each click by default (random seed); unticking "random" fixes the seed for reproducible runs.
    const seed = $("[name=seed]", form), random = $("[name=seed-random]", form);
    seed.disabled = random.checked;
    random.addEventListener("change", (ev) => { seed.disabled = ev.target.checked; });
    form.addEventListener("submit", (ev) => { ev.preventDefault(); submit(form); });
  }
  $("#generate-label").value = m.num_classes > 3 ? classOption(3) : "";
  // An unconditional model (e.g. Energy Matching) has no class to pick and nothing to compose.
  $("[data-field=labels]", forms.generate).hidden = m.num_classes === 0;
  $("#tab-compose").hidden = m.num_classes === 0;
  setupCompose(m);
  setupDenoise(m);
  setupInpaint(m);
  // Every field gets an error line, tied to its controls for screen readers.
  for (const field of $$(".field[data-field]")) addErrorLine(field, field.closest("form").dataset.task + "-" + field.dataset.field);
}

function addErrorLine(container, id) {
  const p = document.createElement("p");
  p.className = "field-error";
  p.id = id + "-error";
  p.setAttribute("aria-live", "polite");
  container.append(p);
  for (const input of $$("input, select", container)) {
    if (!input.closest("li") || container.tagName === "LI") input.setAttribute("aria-describedby", p.id);
  }
}

// -- tabs (arrow keys move between them) --------------------------------------------------------

const tabs = $$("[role=tab]");
function selectTab(tab, focus) {
  for (const t of tabs) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
    $("#" + t.getAttribute("aria-controls")).hidden = !on;
  }
  if (focus) tab.focus();
  showResults($("#" + tab.getAttribute("aria-controls")).dataset.task);
}

function visibleTask() {
  return $("#" + $("[role=tab][aria-selected=true]").getAttribute("aria-controls")).dataset.task;
}

// Each tab shows its own latest job and request; a job of another tab keeps running out of sight.
function showResults(task) {
  const job = state.jobs[task] || null;
  state.job = job;
  $("#empty").hidden = Boolean(job);
  $("#job-bar").hidden = !job;
  $("#images").replaceChildren(...(job ? job.cards.map((card) => card.el) : []));
  if (job) {
    $("#cancel").disabled = job.final;
    renderStatus(job);
    for (const card of job.cards) drawPlot(job, card);       // plots drawn out of sight had no size
  }
  if (state.curls[task]) renderCurl(state.curls[task]);
  else $("#curl-box").hidden = true;
}
for (const [i, tab] of tabs.entries()) {
  tab.addEventListener("click", () => selectTab(tab, false));
  tab.addEventListener("keydown", (ev) => {
    const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[ev.key];
    if (next === undefined) return;
    ev.preventDefault();
    selectTab(tabs[(next + tabs.length) % tabs.length], true);
  });
}

// -- compose: two or more classes with weight sliders -------------------------------------------

function setupCompose(m) {
  const rows = $("#compose-rows");
  const first = m.num_classes > 7 ? [1, 7] : [0, Math.min(1, m.num_classes - 1)];
  rows.replaceChildren();
  for (const label of first) addComposeRow(label, 0.5);
  $("#compose-add").addEventListener("click", () => {
    addComposeRow(null, +(1 / (rows.children.length + 1)).toFixed(2));
    $("li:last-child input", rows).focus();
  });
  updateComposeButtons();
}

function addComposeRow(label, weight) {
  const rows = $("#compose-rows");
  const k = rows.children.length;
  const li = document.createElement("li");
  li.dataset.row = String(k);
  li.innerHTML = `
    <input class="class-input" list="class-list" autocomplete="off" spellcheck="false" name="labels">
    <input type="range" min="-1" max="2" step="0.05" name="weights">
    <output></output>
    <button type="button" class="remove">Remove</button>`;
  const [text, slider] = $$("input", li);
  const out = $("output", li);
  text.value = label === null ? "" : classOption(label);
  slider.value = String(weight);
  out.textContent = Number(weight).toFixed(2);
  slider.addEventListener("input", () => { out.textContent = Number(slider.value).toFixed(2); });
  $(".remove", li).addEventListener("click", () => { li.remove(); renumberCompose(); });
  rows.append(li);
  renumberCompose();
}

function renumberCompose() {
  for (const [k, li] of $$("#compose-rows li").entries()) {
    li.dataset.row = String(k);
    const [text, slider] = $$("input", li);
    text.setAttribute("aria-label", `Class ${k + 1}`);
    slider.setAttribute("aria-label", `Weight of class ${k + 1}`);
    $("output", li).setAttribute("aria-label", `weight ${k + 1}`);
    $(".remove", li).setAttribute("aria-label", `Remove class ${k + 1}`);
    let err = $(".field-error", li);
    if (!err) { err = document.createElement("p"); err.className = "field-error"; li.append(err); }
    err.id = `compose-row-${k}-error`;
    text.setAttribute("aria-describedby", err.id);
    slider.setAttribute("aria-describedby", err.id);
  }
  updateComposeButtons();
}

function updateComposeButtons() {
  const n = $$("#compose-rows li").length;
  for (const b of $$("#compose-rows .remove")) b.disabled = n <= 2;
  if (state.model) $("#compose-add").disabled = n >= state.model.limits.max_composition_labels;
}

// -- denoise: a drawing (scaled to the model's size) or a picked / dropped file ---------------------

const canvas = $("#draw-canvas");
const ctx = canvas.getContext("2d");
let noise = null;        // one fixed noise field per model size, so the preview moves smoothly with the slider

function setupDenoise(m) {
  const size = m.image_size;
  $("#model-size").textContent = `${size}×${size}`;
  for (const c of [$("#preview-input"), $("#preview-noised")]) { c.width = size; c.height = size; }
  noise = Float32Array.from({ length: size * size * 3 }, gaussian);
  clearCanvas();
  $("#denoise-noise").addEventListener("input", updatePreviews);
  $("#denoise-add-noise").addEventListener("change", (ev) => {
    $("#denoise-noise").disabled = !ev.target.checked;
    updatePreviews();
  });
}

function gaussian() {
  const u = 1 - Math.random(), v = Math.random();
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v);
}

function clearCanvas() {
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  state.upload = null;
  updatePreviews();
}

let drawing = null;
function brushWidth() { return Math.max(4, 1.15 * canvas.width / Math.min(state.model.image_size, 16)); }
function canvasPoint(ev) {
  const r = canvas.getBoundingClientRect();
  return [(ev.clientX - r.left) * canvas.width / r.width, (ev.clientY - r.top) * canvas.height / r.height];
}
canvas.addEventListener("pointerdown", (ev) => {
  ev.preventDefault();
  canvas.setPointerCapture(ev.pointerId);
  drawing = canvasPoint(ev);
  stroke(drawing, drawing);
});
canvas.addEventListener("pointermove", (ev) => {
  if (!drawing) return;
  const p = canvasPoint(ev);
  stroke(drawing, p);
  drawing = p;
});
for (const name of ["pointerup", "pointercancel"]) {
  canvas.addEventListener(name, () => { if (drawing) { drawing = null; state.upload = null; updatePreviews(); } });
}
function stroke(a, b) {
  ctx.strokeStyle = "#fff";
  ctx.lineWidth = brushWidth();
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(a[0], a[1]);
  ctx.lineTo(b[0], b[1]);
  ctx.stroke();
}
$("#draw-clear").addEventListener("click", clearCanvas);
$("#denoise-file").addEventListener("change", (ev) => { if (ev.target.files[0]) loadFile(ev.target.files[0]); });
const dropArea = $(".draw-area");
dropArea.addEventListener("dragover", (ev) => { ev.preventDefault(); canvas.classList.add("drop"); });
dropArea.addEventListener("dragleave", () => canvas.classList.remove("drop"));
dropArea.addEventListener("drop", (ev) => {
  ev.preventDefault();
  canvas.classList.remove("drop");
  const file = ev.dataTransfer.files[0];
  if (file) loadFile(file);
});

async function loadFile(file) {
  const error = $("#denoise-image-error");
  error.textContent = "";
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch {
    // The server checks the bytes too; this only says early that the browser cannot show it.
    bitmap = null;
  }
  if (bitmap) {
    // The server center-crops to a square; show the same crop on the canvas.
    const side = Math.min(bitmap.width, bitmap.height);
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(bitmap, (bitmap.width - side) / 2, (bitmap.height - side) / 2, side, side, 0, 0, canvas.width, canvas.height);
  } else {
    error.textContent = "this browser cannot show that file; it is sent as it is and the server decides";
  }
  state.upload = { blob: file, name: file.name || "upload.png", fromFile: true };
  updatePreviews();
}

// The canvas reduced to the model's size: an area average, as a Lanczos resize of a drawing would be close to.
function modelPixels() {
  const size = state.model.image_size;
  const out = new ImageData(size, size);
  const src = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  const scale = canvas.width / size;
  for (let ty = 0; ty < size; ty++) {
    for (let tx = 0; tx < size; tx++) {
      const x0 = Math.floor(tx * scale), x1 = Math.max(x0 + 1, Math.floor((tx + 1) * scale));
      const y0 = Math.floor(ty * scale), y1 = Math.max(y0 + 1, Math.floor((ty + 1) * scale));
      const sum = [0, 0, 0];
      for (let y = y0; y < y1; y++) for (let x = x0; x < x1; x++) {
        const i = 4 * (y * canvas.width + x);
        sum[0] += src[i]; sum[1] += src[i + 1]; sum[2] += src[i + 2];
      }
      const count = (x1 - x0) * (y1 - y0), o = 4 * (ty * size + tx);
      for (let c = 0; c < 3; c++) out.data[o + c] = Math.round(sum[c] / count);
      out.data[o + 3] = 255;
    }
  }
  if (state.model.channels === 1) {
    for (let o = 0; o < out.data.length; o += 4) {
      const grey = Math.round(0.299 * out.data[o] + 0.587 * out.data[o + 1] + 0.114 * out.data[o + 2]);
      out.data[o] = out.data[o + 1] = out.data[o + 2] = grey;
    }
  }
  return out;
}

function updatePreviews() {
  if (!state.model) return;
  const pixels = modelPixels();
  $("#preview-input").getContext("2d").putImageData(pixels, 0, 0);
  const g = $("#denoise-add-noise").checked ? Number($("#denoise-noise").value) : 1;
  $("#denoise-noise-value").textContent = $("#denoise-add-noise").checked ? g.toFixed(2) : "off";
  const noised = new ImageData(pixels.width, pixels.height);
  const grey = state.model.channels === 1;
  for (let p = 0; p < pixels.width * pixels.height; p++) {
    for (let c = 0; c < 3; c++) {
      const v = pixels.data[4 * p + c] / 127.5 - 1;                  // pixels -> [-1, 1], as the model sees them
      const x = g * v + (1 - g) * noise[3 * p + (grey ? 0 : c)];
      noised.data[4 * p + c] = Math.max(0, Math.min(255, Math.round(127.5 * x + 128)));
    }
    noised.data[4 * p + 3] = 255;
  }
  $("#preview-noised").getContext("2d").putImageData(noised, 0, 0);
}

function drawingBlob() {
  const c = $("#preview-input");
  return new Promise((resolve) => c.toBlob(resolve, "image/png"));
}

// -- inpaint: a mask painted over the image (model-size cells), white = regenerate when sent -----------

const maskCanvas = $("#mask-canvas");
let maskCells = null;              // Uint8Array(size * size), 1 = regenerate
let inpaintImage = null;           // ImageData of the image to complete (model size), or null = the Denoise tab's

function setupInpaint(m) {
  maskCells = new Uint8Array(m.image_size * m.image_size);
  const half = (lower) => { maskCells.fill(0); const s = m.image_size;
    for (let y = lower ? s / 2 : 0; y < (lower ? s : s / 2); y++) for (let x = 0; x < s; x++) maskCells[y * s + x] = 1;
    drawMask(); };
  $("#mask-lower").addEventListener("click", () => half(true));
  $("#mask-upper").addEventListener("click", () => half(false));
  $("#mask-clear").addEventListener("click", () => { maskCells.fill(0); drawMask(); });
  $("#mask-use-result").addEventListener("click", useFirstResult);
  let painting = false;
  const paint = (ev) => {
    const r = maskCanvas.getBoundingClientRect(), s = m.image_size;
    const x = Math.floor((ev.clientX - r.left) / r.width * s), y = Math.floor((ev.clientY - r.top) / r.height * s);
    if (x >= 0 && y >= 0 && x < s && y < s) { maskCells[y * s + x] = 1; drawMask(); }
  };
  maskCanvas.addEventListener("pointerdown", (ev) => { painting = true; paint(ev); });
  maskCanvas.addEventListener("pointermove", (ev) => { if (painting) paint(ev); });
  window.addEventListener("pointerup", () => { painting = false; });
  $("#tab-inpaint").addEventListener("click", () => drawMask());
  drawMask();
}

function inpaintPixels() { return inpaintImage || modelPixels(); }

function drawMask() {
  const size = state.model.image_size, pixels = inpaintPixels();
  const shown = new ImageData(size, size);
  for (let p = 0; p < size * size; p++) {
    for (let c = 0; c < 3; c++) shown.data[4 * p + c] = pixels.data[4 * p + c];
    if (maskCells[p]) { shown.data[4 * p] = 220; shown.data[4 * p + 1] = 40; shown.data[4 * p + 2] = 40; }
    shown.data[4 * p + 3] = 255;
  }
  const tmp = document.createElement("canvas");
  tmp.width = tmp.height = size;
  tmp.getContext("2d").putImageData(shown, 0, 0);
  const c = maskCanvas.getContext("2d");
  c.imageSmoothingEnabled = size >= 128;
  c.drawImage(tmp, 0, 0, maskCanvas.width, maskCanvas.height);
}

// The first finished image of the latest job (of any tab) that has one: taken from the jobs the page keeps,
// not from the results area, which shows the Inpaint tab's own job; its bytes as the server sent them,
// never a preview frame of the descent.
function firstFinishedImage() {
  const jobs = Object.values(state.jobs).sort((a, b) => b.order - a.order);
  for (const job of jobs) {
    const card = job.cards.find((c) => c.blob);
    if (card) return card.blob;
  }
  return null;
}

async function useFirstResult() {
  const error = $(".form-error", $("#panel-inpaint"));
  const blob = firstFinishedImage();
  if (!blob) { error.textContent = "no finished image yet: generate one first"; return; }
  error.textContent = "";
  const size = state.model.image_size, tmp = document.createElement("canvas");
  tmp.width = tmp.height = size;
  const c = tmp.getContext("2d");
  c.imageSmoothingEnabled = false;
  c.drawImage(await createImageBitmap(blob), 0, 0, size, size);
  inpaintImage = c.getImageData(0, 0, size, size);
  drawMask();
}

function pngOf(pixels) {
  const c = document.createElement("canvas");
  c.width = pixels.width; c.height = pixels.height;
  c.getContext("2d").putImageData(pixels, 0, 0);
  return new Promise((resolve) => c.toBlob(resolve, "image/png"));
}

async function inpaintRequest(options, problems) {
  const size = state.model.image_size, mask = new ImageData(size, size);
  for (let p = 0; p < size * size; p++) {
    const v = maskCells[p] ? 255 : 0;
    mask.data[4 * p] = mask.data[4 * p + 1] = mask.data[4 * p + 2] = v;
    mask.data[4 * p + 3] = 255;
  }
  const fields = [];
  const label = $("#inpaint-label").value;
  if (label.trim()) fields.push(["label", String(parseLabel(label))]);
  for (const [name, value] of Object.entries(options)) fields.push([name, String(value)]);
  // The image goes at the model's size, so the mask (same size) fits it.
  const upload = { blob: await pngOf(inpaintPixels()), name: "image.png", fromFile: false };
  return { task: "inpaint", path: "v1/inpaint", form: fields, upload, mask: await pngOf(mask), problems };
}

// -- requests ---------------------------------------------------------------------------------

const NUMBER_FIELDS = ["n", "seed", "guidance_scale", "step_size", "mu", "max_steps", "grad_norm_threshold", "deadline_s"];

// The sampling options as typed: empty fields are left out (the model's defaults apply), values are sent
// as they are so that the server's validation, not the page, decides what is allowed.
function readOptions(form, problems) {
  const body = {};
  for (const name of NUMBER_FIELDS) {
    const input = $(`[name=${name}]`, form);
    if (input.disabled) continue;
    if (input.validity.badInput) { problems.push([name, null, "not a number"]); continue; }
    if (input.value.trim() !== "") body[name] = Number(input.value);
  }
  const sampler = $("[name=sampler]", form).value;
  if (sampler) body.sampler = sampler;
  body.format = $("[name=format]", form).value;
  return body;
}

async function buildRequest(form) {
  const task = form.dataset.task, problems = [];
  const options = readOptions(form, problems);
  if (task === "generate") {
    const text = $("#generate-label").value;
    const body = Object.assign({ labels: text.trim() ? [parseLabel(text)] : [] }, options);
    return { task, path: "v1/generations", json: body, problems };
  }
  if (task === "compose") {
    const rows = $$("#compose-rows li");
    const body = Object.assign({
      labels: rows.map((li) => parseLabel($("input[name=labels]", li).value)),
      weights: rows.map((li) => Number($("input[name=weights]", li).value)),
    }, options);
    return { task, path: "v1/compositions", json: body, problems };
  }
  if (task === "inpaint") return inpaintRequest(options, problems);
  const fields = [];
  const label = $("#denoise-label").value;
  if (label.trim()) fields.push(["label", String(parseLabel(label))]);
  if ($("#denoise-add-noise").checked) fields.push(["noise_level", $("#denoise-noise").value]);
  for (const [name, value] of Object.entries(options)) fields.push([name, String(value)]);
  let upload = state.upload;
  if (!upload) upload = { blob: await drawingBlob(), name: "drawing.png", fromFile: false };
  return { task, path: "v1/denoise", form: fields, upload, problems };
}

function shellQuote(text) { return "'" + String(text).replace(/'/g, "'\\''") + "'"; }

function curlFor(req) {
  const parts = [`curl -s -X POST ${shellQuote(new URL(req.path, document.baseURI).href)}`];
  if (apiKey()) parts.push(`-H "Authorization: Bearer $EQM_API_KEY"`);
  if (req.json) {
    parts.push("-H 'Content-Type: application/json'", "-d " + shellQuote(JSON.stringify(req.json)));
  } else {
    parts.push("-F " + shellQuote("image=@" + req.upload.name));
    if (req.mask) parts.push("-F " + shellQuote("mask=@mask.png"));
    for (const [name, value] of req.form) parts.push("-F " + shellQuote(`${name}=${value}`));
  }
  return parts.join(" \\\n     ");
}

function clearErrors(form) {
  for (const p of $$(".field-error, .form-error", form)) p.textContent = "";
  for (const el of $$("[aria-invalid]", form)) el.removeAttribute("aria-invalid");
}

// Where a field's error goes: its row for the composition's labels and weights, else its field.
function errorTarget(form, name, index) {
  if (form.dataset.task === "compose" && (name === "labels" || name === "weights") && Number.isInteger(index)) {
    const li = $(`#compose-rows li[data-row="${index}"]`);
    if (li) return { line: $(".field-error", li), input: $(`input[name=${name}]`, li) };
  }
  const field = $(`.field[data-field="${name}"]`, form);
  if (!field) return null;
  return { line: $(":scope > .field-error", field) || $(".field-error", field), input: $(`[name=${name}]`, field) };
}

function showErrors(form, errors, fallback) {
  let first = null;
  for (const [name, index, msg] of errors) {
    const target = name && errorTarget(form, name, index);
    if (!target) { $(".form-error", form).textContent = fallback || msg; continue; }
    target.line.textContent = target.line.textContent ? target.line.textContent + "; " + msg : msg;
    if (target.input) { target.input.setAttribute("aria-invalid", "true"); first = first || target.input; }
  }
  if (first) first.focus();
}

async function submit(form) {
  clearErrors(form);
  const req = await buildRequest(form);
  if (req.problems.length) { showErrors(form, req.problems); return; }
  const button = $("button[type=submit]", form);
  button.disabled = true;
  try {
    let resp;
    if (req.json) {
      resp = await api(req.path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(req.json) });
    } else {
      const data = new FormData();
      data.append("image", req.upload.blob, req.upload.name);
      if (req.mask) data.append("mask", req.mask, "mask.png");
      for (const [name, value] of req.form) data.append(name, value);
      resp = await api(req.path, { method: "POST", body: data });
    }
    showCurl(req);
    if (resp.status === 401) { showKeyPanel("The server refused the key; enter it again."); return; }
    if (!resp.ok) {
      const { body, text } = await readError(resp);
      if (resp.status === 422 && body && Array.isArray(body.detail)) {
        // [{"loc": ["body", "max_steps"], "msg": "..."}]: each message beside its field
        showErrors(form, body.detail.map((e) => [e.loc[0] === "body" ? e.loc[1] : null, e.loc[2], e.msg]), body.message);
      } else if (req.upload && (resp.status === 413 || resp.status === 415)) {
        showErrors(form, [["image", null, text]]);
      } else {
        $(".form-error", form).textContent = text;
      }
      return;
    }
    startJob(await resp.json(), req);
  } catch (err) {
    $(".form-error", form).textContent = "The request did not reach the server: " + err.message;
  } finally {
    button.disabled = false;
  }
}

function showCurl(req) {
  state.curls[req.task] = req;
  if (visibleTask() === req.task) renderCurl(req);
}

function renderCurl(req) {
  $("#curl-box").hidden = false;
  $("#curl-text").value = curlFor(req);
  $("#curl-text").rows = Math.min(14, $("#curl-text").value.split("\n").length);
  $("#curl-copied").textContent = "";
  let link = $("#curl-upload");
  if (req.upload && !req.upload.fromFile) {
    // The curl line names drawing.png: offer that file, so the command runs as shown.
    if (!link) {
      link = document.createElement("a");
      link.id = "curl-upload";
      $("#curl-box").append(" ", link);
    }
    if (link.href.startsWith("blob:")) URL.revokeObjectURL(link.href);
    link.href = URL.createObjectURL(req.upload.blob);
    link.download = req.upload.name;
    link.textContent = "download " + req.upload.name;
  } else if (link) {
    link.remove();
  }
}

$("#curl-copy").addEventListener("click", async () => {
  const text = $("#curl-text");
  try {
    await navigator.clipboard.writeText(text.value);
    $("#curl-copied").textContent = "copied";
  } catch {
    text.focus();
    text.select();
    $("#curl-copied").textContent = "selected: press Ctrl+C";
  }
});

// -- a job: cards, events, cancel -----------------------------------------------------------------

let jobsStarted = 0;
function startJob(created, req) {
  if (state.jobs[req.task]) state.jobs[req.task].controller.abort();
  const job = {
    order: ++jobsStarted, id: created.id, links: created.links, task: req.task, status: created.status, final: false,
    threshold: null, maxSteps: null, cards: [], controller: new AbortController(), format: (req.json || {}).format,
  };
  state.jobs[req.task] = job;
  for (let k = 0; k < created.num_images; k++) job.cards.push(makeCard(job, k));
  setStatus(job, "queued");
  loadStatus(job);
  followEvents(job);
  if (visibleTask() !== req.task) return;           // its tab was left while the request was on its way
  showResults(req.task);
  // The submit button may be far below the results (a long form, or one column on phones): bring them into view.
  const top = $("#job-bar").getBoundingClientRect().top;
  if (top < 0 || top > window.innerHeight / 2) $(".results").scrollIntoView({ block: "start" });
}

function makeCard(job, k) {
  const el = document.createElement("article");
  el.className = "card";
  el.dataset.index = String(k);
  el.dataset.state = "waiting";
  el.innerHTML = `
    <div class="frame"><span>waiting</span></div>
    <h3><span class="title">image ${k}</span><span class="steps" aria-label="steps taken">0 steps</span></h3>
    <p class="meta"><span class="seed"></span> <span class="norm"></span></p>
    <canvas class="plot" role="img" aria-label="gradient norm per step"></canvas>
    <p class="meta badges"></p>
    <a class="download" hidden>download</a>`;
  return { el, index: k, steps: 0, norm: null, norms: [], final: false, seed: null, blob: null };
}

async function loadStatus(job) {
  const resp = await api(job.links.self).catch(() => null);
  if (!resp || !resp.ok || state.jobs[job.task] !== job) return;
  const status = await resp.json();
  job.threshold = status.sampler.grad_norm_threshold;
  job.maxSteps = status.sampler.max_steps;
  for (const img of status.images) {
    const card = job.cards[img.index];
    if (!card) continue;
    card.seed = img.seed;
    $(".seed", card.el).textContent = `seed ${img.seed}`;
    $(".title", card.el).textContent = titleFor(job, img);
    drawPlot(job, card);
  }
  if (status.status !== "queued" && !job.final) setStatus(job, status.status);
}

function titleFor(job, img) {
  const names = img.labels.map((y) => (className(y) === String(y) ? `class ${y}` : className(y)));
  if (job.task === "compose") return names.join(" + ");
  if (job.task === "denoise") return names.length ? `denoised → ${names[0]}` : "denoised";
  if (job.task === "inpaint") return names.length ? `inpainted → ${names[0]}` : "inpainted";
  return names.length ? names[0] : "unconditional";
}

function setStatus(job, status, extra) {
  job.status = status;
  job.statusExtra = extra;
  if (state.job === job) renderStatus(job);
}

function renderStatus(job) {
  const el = $("#job-status");
  el.dataset.status = job.status;
  el.textContent = `Job ${job.id.slice(0, 8)}: ${job.status}${job.statusExtra ? " — " + job.statusExtra : ""}`;
}

// Server-sent events read with fetch (EventSource cannot send the API key), resumed with Last-Event-ID.
async function followEvents(job) {
  let lastId = null;
  for (let attempt = 0; attempt < 5 && !job.final; attempt++) {
    try {
      const headers = lastId ? { "Last-Event-ID": lastId } : {};
      // previews=true: progress entries carry each running image's iterate, so the images form in place.
      const resp = await api(job.links.events + "?previews=true", { headers, signal: job.controller.signal });
      if (!resp.ok) { setStatus(job, job.status, (await readError(resp)).text); return; }
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const ev = { event: "message", data: "", id: null };
          for (const line of block.split("\n")) {
            if (line.startsWith(":")) continue;
            const colon = line.indexOf(":");
            const key = colon < 0 ? line : line.slice(0, colon);
            const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
            if (key === "event") ev.event = val; else if (key === "data") ev.data += val; else if (key === "id") ev.id = val;
          }
          if (ev.id) lastId = ev.id;
          if (ev.data) onEvent(job, ev.event, JSON.parse(ev.data));
        }
      }
    } catch (err) {
      if (job.controller.signal.aborted) return;
    }
    if (!job.final) await new Promise((r) => setTimeout(r, 500));
  }
}

function onEvent(job, event, data) {
  if (state.jobs[job.task] !== job) return;
  if (event === "queued") setStatus(job, "queued");
  else if (event === "started") setStatus(job, "running");
  else if (event === "progress") {
    for (const [i, entry] of (data.images || []).entries()) {
      const card = job.cards[entry.index ?? i];
      if (!card || card.final) continue;
      // Servers that send no per-step norms still give the last one: plot what there is.
      addNorms(card, entry.norms ?? (entry.grad_norm != null ? [entry.grad_norm] : []));
      card.steps = entry.steps;
      card.norm = entry.grad_norm;
      card.el.dataset.state = "running";
      if (entry.preview) showPreview(card, entry.preview);
      updateCard(job, card);
    }
  } else if (event === "image") finishCard(job, data);
  else if (["done", "cancelled", "failed", "expired", "error"].includes(event)) finishJob(job, event, data);
}

function showPreview(card, url) {
  const frame = $(".frame", card.el);
  let img = $("img.preview", frame);
  if (!img) {
    img = document.createElement("img");
    img.className = "preview" + (state.model.image_size >= 128 ? " smooth" : "");
    img.alt = "the image as it forms";
    frame.replaceChildren(img);
  }
  img.src = url;
}

function addNorms(card, norms) { for (const n of norms) if (Number.isFinite(n)) card.norms.push(n); }

function updateCard(job, card) {
  const max = job.maxSteps ? ` / ${job.maxSteps}` : "";
  $(".steps", card.el).textContent = `${card.steps}${card.final ? "" : max} steps`;
  $(".norm", card.el).textContent = card.norm == null ? "" : `· ‖g‖ ${formatNorm(card.norm)}`;
  const frame = $(".frame span", card.el);
  if (frame && !card.final) frame.textContent = "descending…";
  if (card.energy != null) $(".norm", card.el).textContent += ` · E ${card.energy.toPrecision(4)}`;
  drawPlot(job, card);
}

function formatNorm(x) { return x >= 100 ? x.toFixed(0) : x >= 1 ? x.toFixed(2) : x.toPrecision(3); }

async function finishCard(job, data) {
  const card = job.cards[data.index];
  if (!card) return;
  addNorms(card, data.norms ?? (data.grad_norm != null ? [data.grad_norm] : []));
  card.final = true;
  card.steps = data.steps;
  card.norm = data.grad_norm;
  card.energy = data.energy ?? null;        // EqM-E models: the image's energy (lower on data)
  const outcome = data.stopped_early ? "converged" : data.deadline_exceeded ? "deadline" : "step_cap";
  card.el.dataset.state = outcome;
  const badge = { converged: ["converged", "stopped early", `its gradient norm fell below ${job.threshold}`],
                  deadline: ["deadline", "deadline reached", "returned as it was at the job's deadline"],
                  step_cap: ["cap", "ran all its steps", "reached the step cap before the threshold"] }[outcome];
  $(".badges", card.el).innerHTML = `<span class="badge ${badge[0]}" title="${badge[2]}">${badge[1]}</span>`;
  updateCard(job, card);
  const resp = await api(job.links.images[data.index]).catch(() => null);
  if (!resp || !resp.ok) return;
  card.blob = await resp.blob();
  const url = URL.createObjectURL(card.blob);
  const img = document.createElement("img");
  const size = state.model.image_size;
  img.alt = `${$(".title", card.el).textContent}, seed ${card.seed ?? "?"}, ${card.steps} steps`;
  img.src = url;
  if (size >= 128) img.className = "smooth";           // small models are upscaled nearest-neighbour
  $(".frame", card.el).replaceChildren(img);
  const link = $(".download", card.el);
  const ext = (data.content_type || "image/png").split("/")[1];
  link.href = url;
  link.download = `eqm-${job.id.slice(0, 8)}-${data.index}.${ext}`;
  link.textContent = `download ${ext.toUpperCase()} (${size}×${size})`;
  link.hidden = false;
}

function finishJob(job, event, data) {
  job.final = true;
  if (state.job === job) $("#cancel").disabled = true;
  const extra = event === "failed" || event === "error" || event === "expired" ? data.error || data.detail : "";
  setStatus(job, event, extra);
  for (const card of job.cards) {
    if (card.final) continue;                      // its image came: it stays shown
    card.final = true;                             // no more steps for it: no longer "descending"
    card.el.dataset.state = event === "cancelled" ? "cancelled" : "failed";
    $(".badges", card.el).innerHTML = `<span class="badge cancelled">${event === "cancelled" ? "cancelled" : event}</span>`;
    updateCard(job, card);
    // Its last preview stays where there was one (how far the descent got), marked as an unfinished iterate:
    // it keeps its "preview" class, gets no download link, and the frame says why it stopped.
    const frame = $(".frame", card.el), last = $("img.preview", frame);
    const note = document.createElement("span");
    note.className = "frame-note";
    note.textContent = event === "cancelled" ? "cancelled" : "no image";
    frame.replaceChildren(...(last ? [last, note] : [note]));
  }
}

$("#cancel").addEventListener("click", async () => {
  const job = state.job;
  if (!job || job.final) return;
  $("#cancel").disabled = true;
  const resp = await api(job.links.self, { method: "DELETE" }).catch(() => null);
  if (!resp) { $("#cancel").disabled = false; return; }
  const body = await resp.json().catch(() => ({}));
  if (!job.final) setStatus(job, job.status, body.message || body.detail || "");
});

// -- the descent plot: gradient norm per evaluation (log scale) with the threshold line -----------------

function drawPlot(job, card) {
  const c = $("canvas.plot", card.el);
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(1, Math.round(c.clientWidth * dpr)), h = Math.max(1, Math.round(c.clientHeight * dpr));
  if (c.width !== w || c.height !== h) { c.width = w; c.height = h; }
  const g = c.getContext("2d");
  g.clearRect(0, 0, w, h);
  g.fillStyle = "#f3f5f8";
  g.fillRect(0, 0, w, h);
  const norms = card.norms.filter((n) => n > 0);
  const threshold = job.threshold > 0 ? job.threshold : null;
  if (!norms.length) return;
  const values = threshold ? norms.concat([threshold]) : norms;
  let lo = Math.log(Math.min(...values)), hi = Math.log(Math.max(...values));
  if (hi - lo < 1e-6) { lo -= 0.5; hi += 0.5; }
  const pad = 4 * dpr;
  // A finished image spans the plot; a running one gets room to go on (up to its step cap).
  const span = card.final ? norms.length : Math.min(job.maxSteps || Infinity, Math.max(20, Math.ceil(norms.length * 1.3)));
  const xs = Math.max(span, norms.length, 2) - 1;
  const px = (i) => pad + (w - 2 * pad) * i / xs;
  const py = (v) => h - pad - (h - 2 * pad) * (Math.log(v) - lo) / (hi - lo);
  if (threshold) {
    g.strokeStyle = "#b3261e";
    g.setLineDash([4 * dpr, 3 * dpr]);
    g.lineWidth = dpr;
    g.beginPath();
    g.moveTo(pad, py(threshold));
    g.lineTo(w - pad, py(threshold));
    g.stroke();
    g.setLineDash([]);
  }
  g.strokeStyle = "#1f5fbf";
  g.lineWidth = 1.5 * dpr;
  g.beginPath();
  norms.forEach((v, i) => (i ? g.lineTo(px(i), py(v)) : g.moveTo(px(i), py(v))));
  g.stroke();
  const last = norms[norms.length - 1];
  g.fillStyle = threshold && last < threshold ? "#1e7a3c" : "#1f5fbf";
  g.beginPath();
  g.arc(px(norms.length - 1), py(last), 2.5 * dpr, 0, 2 * Math.PI);
  g.fill();
  g.fillStyle = "#5b6470";
  g.font = `${10 * dpr}px system-ui, sans-serif`;
  g.textAlign = "right";                                 // the descent starts top left: label the other corner
  g.fillText(`max ‖g‖ ${formatNorm(Math.exp(hi))}`, w - pad, pad + 10 * dpr);
  c.setAttribute("aria-label", `gradient norm over ${norms.length} evaluations, from ${formatNorm(norms[0])} to ` +
    `${formatNorm(last)}${threshold ? `; threshold ${threshold}` : ""}`);
}

start();
