// lsms viewer: talks only to the server that served it (see lsms/serve/http.py for the routes).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { sid: null, info: null, image: null, busy: false, predicted: false, pending: false };

async function api(method, path, body, isForm) {
  const url = path + (path.includes("?") ? "&" : "?") + "sid=" + encodeURIComponent(state.sid || "");
  const opts = { method };
  if (body !== undefined) {
    opts.body = isForm ? body : JSON.stringify(body);
    if (!isForm) opts.headers = { "Content-Type": "application/json" };
  }
  let res;
  try {
    res = await fetch(url, opts);
  } catch (err) {
    throw new Error("the server does not answer (stopped?): " + err.message);
  }
  const data = await res.json().catch(() => ({ error: "bad answer from the server (" + res.status + ")" }));
  if (!res.ok) throw new Error(data.error || ("error " + res.status));
  return data;
}

function say(text, isError) {
  const m = $("message");
  m.textContent = text || "";
  m.className = isError ? "error" : "";
}

function q(params) {
  const u = new URLSearchParams({ sid: state.sid, ...params });
  return u.toString();
}

// ------------------------------------------------------------------ sentences

function sentences() {
  return Array.from(document.querySelectorAll("textarea.sentence")).map((t) => t.value);
}

function addSentence(text) {
  const boxes = document.querySelectorAll("textarea.sentence");
  if (boxes.length >= state.info.limits.sentences) return;
  const row = document.createElement("div");
  row.className = "sentence-row";
  const t = document.createElement("textarea");
  t.className = "sentence";
  t.placeholder = state.info.model.uses_text ? "e.g. the larger cyst in segment VI" : "(this model ignores text)";
  t.value = text || "";
  t.rows = 1;
  t.addEventListener("input", () => fitHeight(t));
  const swatch = document.createElement("span");
  swatch.className = "swatch";
  swatch.title = "this sentence's colour in the results";
  const x = document.createElement("button");
  x.type = "button";
  x.textContent = "×";
  x.title = "remove this sentence";
  x.addEventListener("click", () => {
    if (document.querySelectorAll("textarea.sentence").length > 1) { row.remove(); colourSentences(); }
  });
  row.append(swatch, t, x);
  $("texts").append(row);
  fitHeight(t);
  colourSentences();
}

// a sentence box is as tall as its text: a long sentence shows whole, never cut
function fitHeight(t) {
  t.style.height = "auto";
  t.style.height = (t.scrollHeight + t.offsetHeight - t.clientHeight) + "px";
}

function colourSentences() {
  document.querySelectorAll(".sentence-row .swatch").forEach((s, i) => {
    s.style.background = state.info.colours[i % state.info.colours.length];
  });
  $("add-sentence").disabled = document.querySelectorAll("textarea.sentence").length >= state.info.limits.sentences;
}

function setSentences(texts) {
  $("texts").replaceChildren();
  (texts.length ? texts.slice(0, 2) : [""]).forEach(addSentence);
}

// ------------------------------------------------------------------ image

function threshold() { return parseFloat($("threshold").value); }
function slice() { return parseInt($("slice").value, 10); }

async function opened(info) {
  state.image = info;
  state.predicted = false;
  $("image-info").textContent = `${info.name}: ${info.format}${info.modality ? " " + info.modality : ""}, ` +
    `${info.shape.join(" x ")}${info.depth > 1 ? `, ${info.depth} slices` : ""}`;
  const w = $("window");
  w.replaceChildren(...info.windows.map((name) => new Option(name, name, false, name === info.window)));
  $("slice-label").hidden = info.depth <= 1;
  $("volume-box").hidden = info.depth <= 1;
  $("slice").max = String(info.depth - 1);
  $("slice").value = String(info.slice);
  $("slice-value").textContent = String(info.slice);
  $("progress").value = 0;
  $("progress-text").textContent = "";
  if (info.texts && info.texts.length) setSentences(info.texts);
  showPanels([imagePanel()]);
  $("settings-link").hidden = true;
  say(info.texts && info.texts.length ? `Opened ${info.name} with its reference sentences: press Segment, or edit them.`
                                       : `Opened ${info.name}. Type a sentence and press Segment.`);
}

function imageUrl() {
  return "/api/image.png?" + q({ slice: slice(), window: $("window").value });
}

function imagePanel() {
  const p = document.createElement("div");
  p.className = "panel image-only";
  const img = new Image();
  img.src = imageUrl();
  img.alt = "image";
  img.className = "base";
  p.append(img);
  return p;
}

async function openFiles(files) {
  if (!files.length) return;
  const total = Array.from(files).reduce((n, f) => n + f.size, 0);
  if (total > state.info.limits.upload_bytes) {
    say(`The upload is ${(total / 2 ** 20).toFixed(0)} MB; the limit is ` +
        `${(state.info.limits.upload_bytes / 2 ** 20).toFixed(0)} MB.`, true);
    return;
  }
  const form = new FormData();
  for (const f of files) form.append("file", f, f.webkitRelativePath || f.name);
  say(`Uploading ${files.length === 1 ? files[0].name : files.length + " files"}…`);
  try {
    await opened(await api("POST", "/api/open", form, true));
  } catch (err) {
    say(err.message, true);
  }
}

// ------------------------------------------------------------------ segmentation

async function segment() {
  if (!state.image) { say("Open an image first.", true); return; }
  if (state.busy) { state.pending = true; return; }
  state.busy = true;
  $("segment").disabled = true;
  const texts = sentences();
  const req = { slice: slice(), texts, threshold: threshold(), window: $("window").value,
                features: $("features").checked };
  say("Segmenting…");
  try {
    const out = await api("POST", "/api/predict", req);
    showResults(out, req);
    state.predicted = true;
    say(out.message);
  } catch (err) {
    say(err.message, true);
  } finally {
    state.busy = false;
    $("segment").disabled = false;
    if (state.pending) { state.pending = false; segment(); }
  }
}

function showResults(out, req) {
  const base = imageUrl();
  const panels = out.results.map((r, i) => {
    const colour = state.info.colours[i % state.info.colours.length];
    const p = document.createElement("div");
    p.className = "panel result";
    p.dataset.index = String(i);
    const cap = document.createElement("div");
    cap.className = "caption";
    const dot = document.createElement("span");
    dot.className = "swatch";
    dot.style.background = colour;
    cap.append(dot, r.text || "(no text)");
    const pair = document.createElement("div");
    pair.className = "pair";
    const left = document.createElement("div");
    const stack = document.createElement("div");
    stack.className = "stack";
    const img = new Image(); img.src = base; img.alt = "image";
    const over = new Image(); over.src = r.overlay; over.className = "over mask"; over.alt = "mask";
    stack.append(img, over);
    const l1 = document.createElement("small"); l1.textContent = "mask over the image";
    left.append(stack, l1);
    const right = document.createElement("div");
    const prob = new Image(); prob.src = r.probability; prob.className = "probability"; prob.alt = "probability";
    const l2 = document.createElement("small"); l2.textContent = "probability (0 dark .. 1 yellow)";
    right.append(prob, l2);
    pair.append(left, right);
    const stats = document.createElement("div");
    stats.className = "stats";
    stats.innerHTML = "";
    const area = document.createElement("span"); area.className = "area"; area.textContent = String(r.area_px);
    stats.append("area ", area, ` px, max probability ${r.max_probability.toFixed(3)}`);
    // the existence score beside the model's threshold: under it the described lesion is not here (no mask)
    const ex = document.createElement("div");
    ex.className = "existence";
    const verdict = document.createElement("strong");
    verdict.className = r.found ? "found" : "not-found";
    verdict.textContent = r.found ? "found" : "not found";
    ex.append(`existence score ${r.existence.toFixed(2)} ` + (out.existence_threshold === null ?
      "(no existence threshold: never withheld): " : `(threshold ${out.existence_threshold.toFixed(2)}): `), verdict);
    stats.append(ex);
    if (r.warning) {  // lsms serve --allow-modality-mismatch: not the kind of image the model reads
      const w = document.createElement("strong"); w.className = "not-found";
      w.textContent = ` — ${r.warning}`;
      stats.append(w);
    }
    const links = document.createElement("div");
    links.className = "links";
    const stem = (state.image.name.replace(/\.(nii\.gz|nii|png|jpe?g|tiff?|npy|npz|dcm|zip)$/i, "") +
                  (state.image.depth > 1 ? `_z${String(req.slice).padStart(4, "0")}` : "") +
                  (out.results.length > 1 ? `_t${i}` : "")).replace(/[^A-Za-z0-9._-]/g, "_");
    const png = document.createElement("a");
    png.className = "mask-link";
    png.textContent = "mask PNG";
    png.download = stem + "_mask.png";
    png.href = "/api/mask.png?" + q({ slice: req.slice, text: r.text, threshold: out.threshold, name: png.download });
    links.append(png);
    if (state.image.geometry) {
      const nii = document.createElement("a");
      nii.className = "nifti-link";
      nii.textContent = "mask NIfTI (input geometry)";
      nii.download = stem.replace(/_z\d+/, "") + "_mask.nii.gz";
      nii.href = "/api/mask.nii.gz?" + q({ text: r.text, threshold: out.threshold, name: nii.download });
      nii.title = "every slice segmented so far with this sentence and threshold (after Whole volume: its one 3D answer)";
      links.append(nii);
    }
    if (state.image.dicom_seg && r.volume) {  // a DICOM series after Whole volume: the 3D answer as DICOM-SEG
      const seg = document.createElement("a");
      seg.className = "seg-link";
      seg.textContent = "DICOM-SEG";
      seg.download = stem.replace(/_z\d+/, "") + "_seg.dcm";
      seg.href = "/api/mask.seg.dcm?" + q({ text: r.text, threshold: out.threshold, name: seg.download });
      links.append(seg);
    }
    // the numbers and the verdict above the pictures, in view without scrolling; five rows in every panel, so
    // that side-by-side panels line their pictures up (style.css: subgrid)
    const f = document.createElement("div");
    f.className = "features";
    p.append(cap, stats, pair, links, f);
    if (r.features) {
      r.features.forEach((src, s) => {
        const d = document.createElement("div");
        const im = new Image(); im.src = src; im.alt = `F${s + 1}`;
        const l = document.createElement("small"); l.textContent = `stage ${s + 1} (F${s + 1})`;
        d.append(im, l);
        f.append(d);
      });
    }
    return p;
  });
  showPanels(panels);
  const link = $("settings-link");
  const params = new URLSearchParams({ sid: state.sid, slice: req.slice, threshold: out.threshold,
                                       window: req.window, name: "settings.json" });
  out.results.forEach((r) => params.append("text", r.text));
  link.href = "/api/settings.json?" + params.toString();
  link.download = "settings.json";
  link.hidden = false;
}

// one panel: the whole width; several: two columns (the images scale to the space, see style.css)
function showPanels(panels) {
  $("panels").style.setProperty("--columns", String(Math.min(panels.length, 2)));
  $("panels").replaceChildren(...panels);
}

// ------------------------------------------------------------------ whole volume

async function wholeVolume() {
  try {
    let p = await api("POST", "/api/volume", { texts: sentences(), threshold: threshold() });
    $("volume").disabled = true;
    while (p.state === "running") {
      $("progress").max = p.total;
      $("progress").value = p.done;
      $("progress-text").textContent = `${p.done} / ${p.total}`;
      await new Promise((r) => setTimeout(r, 400));
      p = await api("GET", "/api/volume");
    }
    $("progress").value = p.done;
    $("progress-text").textContent = p.state === "finished" ?
      `done: ${p.total} predictions; the masks now show each sentence's one 3D answer: ` +
      p.answers.map((a) => a.present ? `${a.voxels} voxels` + (a.volume_ml === null ? "" : ` (${a.volume_ml} ml, ${a.diameter_mm} mm across)`) :
                    "not found").join(", ") : p.state + (p.error ? ": " + p.error : "");
    if (p.state === "failed") say(p.error, true);
    if (p.state === "finished") await segment();  // redraw the slice shown with the 3D answers
  } catch (err) {
    say(err.message, true);
  } finally {
    $("volume").disabled = false;
  }
}

// ------------------------------------------------------------------ start

let sliceTimer = null;

async function start() {
  try {
    state.info = await api("POST", "/api/session");
  } catch (err) {
    say(err.message, true);
    return;
  }
  state.sid = state.info.sid;
  $("file").accept = state.info.accept;  // the endings lsms reads
  const m = state.info.model;
  $("model-info").textContent = `model ${m.name} · ${m.uses_text ? "reads text" : "no text"} · ` +
    `input ${m.image_size.join("x")}${m.device ? " · " + m.device : ""}`;
  $("example").replaceChildren(...state.info.examples.map((e) =>
    new Option(`${e.id} (${e.texts.length} lesions)`, e.id)));
  if (!state.info.examples.length) {  // the bundled slices are CT; this model does not read CT windows
    $("example").append(new Option("(none: this model was not trained on CT)", ""));
    $("example").disabled = $("open-example").disabled = true;
  }
  setSentences([]);
  $("open-example").addEventListener("click", openExample);
  $("file").addEventListener("change", (e) => openFiles(e.target.files));
  $("folder").addEventListener("change", (e) => openFiles(e.target.files));
  $("add-sentence").addEventListener("click", () => addSentence(""));
  $("segment").addEventListener("click", segment);
  $("volume").addEventListener("click", wholeVolume);
  $("threshold").addEventListener("input", () => {
    $("threshold-value").textContent = threshold().toFixed(2);
  });
  $("threshold").addEventListener("change", () => { if (state.predicted) segment(); });
  $("window").addEventListener("change", () => {
    if (state.predicted) segment(); else if (state.image) showPanels([imagePanel()]);
  });
  $("features").addEventListener("change", () => { if (state.predicted) segment(); });
  $("slice").addEventListener("input", () => {
    $("slice-value").textContent = $("slice").value;
    clearTimeout(sliceTimer);
    sliceTimer = setTimeout(() => {
      if (state.predicted) segment(); else showPanels([imagePanel()]);
    }, 120);
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Enter" && e.ctrlKey) segment(); });
  setInterval(() => api("POST", "/api/ping").catch((err) => say(err.message, true)), 60000);
  window.addEventListener("pagehide", () => navigator.sendBeacon("/api/close?sid=" + encodeURIComponent(state.sid)));
  if (state.info.examples.length) await openExample();
  else say("Open an image file.");
  document.body.dataset.ready = "1";
}

async function openExample() {
  try { await opened(await api("POST", "/api/example", { id: $("example").value })); } catch (err) { say(err.message, true); }
}

start();
