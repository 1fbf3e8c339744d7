// lrponnx web page: loads the explainer with onnxruntime-web, explains a dropped or chosen image, draws the
// heatmap and the overlay, and explains another class on a click. The numbers live in lrp.js.
import * as lrp from "./lrp.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const backend = params.get("ep") === "webgpu" ? "webgpu" : "wasm";

// What the page did, for people with a console and for the browser test (tests/test_web.py).
const state = (window.lrponnx = { state: "loading", runs: 0, error: null, backend });

let ort, session, meta, pre, C, H, W;
let image = null;     // {name, tensor, display}
let scores = null;    // probabilities of the current image
let predicted = -1;
let busy = Promise.resolve();

function status(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

function fail(e) {
  const msg = e && e.message ? e.message : String(e);
  state.state = "error";
  state.error = msg;
  status(`error: ${msg}`, true);
  console.error(e);
}

function className(k) {
  return meta.classes && meta.classes[k] !== undefined ? meta.classes[k] : `class ${k}`;
}

// ------------------------------------------------------------------------------------------------
// start-up
// ------------------------------------------------------------------------------------------------
async function loadRuntime() {
  const file = backend === "webgpu" ? "ort.webgpu.min.mjs" : "ort.wasm.min.mjs";
  ort = await import(new URL(`ort/${file}`, location.href).href);
  ort.env.wasm.wasmPaths = new URL("ort/", location.href).href;
  ort.env.logLevel = "error";
  if (!self.crossOriginIsolated) ort.env.wasm.numThreads = 1;  // threads need SharedArrayBuffer
  if (backend === "webgpu" && !navigator.gpu) {
    throw new Error("this browser offers no WebGPU (navigator.gpu); use the WebAssembly runtime");
  }
}

async function start() {
  $("backend").value = backend;
  $("legend-bar").style.background = lrp.lutGradient();
  meta = await (await fetch("meta.json")).json();
  state.meta = meta;
  pre = meta.preprocessing;
  [H, W] = pre.size;
  C = pre.channel_order === "gray" ? 1 : 3;
  const parts = [`<b>${escapeHtml(meta.name)}</b>`];
  if (meta.zoo) parts.push(escapeHtml(meta.zoo));
  if (meta.composite) parts.push(escapeHtml(meta.composite));
  parts.push(`input ${C}×${H}×${W} ${pre.channel_order.toUpperCase()}`);
  if (meta.class_count) parts.push(`${meta.class_count} classes`);
  $("model-line").innerHTML = parts.join(" · ");
  for (const id of ["input-canvas", "heat-canvas", "overlay-canvas"]) {
    const c = $(id);
    c.width = W; c.height = H;
    c.classList.toggle("smooth", Math.max(W, H) >= 160);
  }
  $("input-size").textContent = `${W}×${H}`;
  setupInputs();

  status(`loading onnxruntime-web (${backend})…`);
  await loadRuntime();
  status("loading the explainer…");
  const t0 = performance.now();
  const bytes = new Uint8Array(await (await fetch(meta.model_url)).arrayBuffer());
  session = await ort.InferenceSession.create(bytes, { executionProviders: [backend] });
  const missing = [meta.input.name, meta.target_input].filter((n) => !session.inputNames.includes(n));
  if (missing.length) throw new Error(`the explainer has no input ${missing.join(", ")} in onnxruntime-web`);
  state.state = "ready";
  status(`ready: explainer loaded in ${Math.round(performance.now() - t0)} ms (${backend}` +
         `${backend === "wasm" ? `, ${ort.env.wasm.numThreads || "auto"} thread(s)` : ""}). Drop an image.`);
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function setupInputs() {
  const drop = $("drop");
  $("file").addEventListener("change", (ev) => {
    const f = ev.target.files && ev.target.files[0];
    if (f) explainBlob(f, f.name);
    ev.target.value = "";
  });
  for (const t of ["dragenter", "dragover"]) {
    drop.addEventListener(t, (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  }
  for (const t of ["dragleave", "drop"]) {
    drop.addEventListener(t, (ev) => { ev.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (ev) => {
    const f = ev.dataTransfer && ev.dataTransfer.files && ev.dataTransfer.files[0];
    if (f) explainBlob(f, f.name);
  });
  // dropping beside the box should not navigate away
  window.addEventListener("dragover", (ev) => ev.preventDefault());
  window.addEventListener("drop", (ev) => ev.preventDefault());

  if (meta.samples && meta.samples.length) {
    $("samples-box").hidden = false;
    for (const name of meta.samples) {
      const b = document.createElement("button");
      b.type = "button";
      b.dataset.sample = name;
      b.innerHTML = `<img alt="" src="samples/${encodeURIComponent(name)}.png" loading="lazy">${escapeHtml(name)}`;
      b.addEventListener("click", async () => {
        const blob = await (await fetch(`samples/${encodeURIComponent(name)}.png`)).blob();
        explainBlob(blob, name);
      });
      $("samples").appendChild(b);
    }
  }
  $("backend").addEventListener("change", () => {
    const u = new URL(location.href);
    u.searchParams.set("ep", $("backend").value);
    location.href = u.href;
  });
  const count = meta.class_count || (meta.classes ? meta.classes.length : 0);
  if (count > 5) {
    const sel = $("any-class");
    sel.innerHTML = `<option value="">choose…</option>` + Array.from({ length: count },
      (_, k) => `<option value="${k}">${meta.classes ? `${k}: ${escapeHtml(className(k))}` : `class ${k}`}</option>`).join("");
    sel.addEventListener("change", () => { if (sel.value !== "") explain(Number(sel.value)); });
  }
}

// ------------------------------------------------------------------------------------------------
// images
// ------------------------------------------------------------------------------------------------
async function decode(blob) {
  // no colour management and no premultiplication: the bytes Pillow would read
  const bmp = await createImageBitmap(blob, {
    colorSpaceConversion: "none", premultiplyAlpha: "none", imageOrientation: "from-image",
  });
  const canvas = new OffscreenCanvas(bmp.width, bmp.height);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bmp, 0, 0);
  const w = bmp.width, h = bmp.height;
  const data = ctx.getImageData(0, 0, w, h).data;
  bmp.close();
  return { rgb: lrp.rgbaToRgb(data, w * h), w, h };
}

function putRgb(canvasId, rgb) {
  const rgba = new Uint8ClampedArray(W * H * 4);
  for (let i = 0; i < W * H; i++) {
    rgba[i * 4] = rgb[i * 3]; rgba[i * 4 + 1] = rgb[i * 3 + 1]; rgba[i * 4 + 2] = rgb[i * 3 + 2]; rgba[i * 4 + 3] = 255;
  }
  ctx2d(canvasId).putImageData(new ImageData(rgba, W, H), 0, 0);
}

function ctx2d(canvasId) {
  return $(canvasId).getContext("2d", { willReadFrequently: true });
}

function putRgba(canvasId, rgba) {
  ctx2d(canvasId).putImageData(new ImageData(rgba, W, H), 0, 0);
}

function explainBlob(blob, name) {
  busy = busy.then(async () => {
    if (!session) throw new Error("the explainer is not loaded yet");
    status(`reading ${name}…`);
    const img = await decode(blob);
    const p = lrp.preprocess(img.rgb, img.w, img.h, pre);
    image = { name, tensor: p.tensor, display: p.display, original: [img.w, img.h] };
    state.image = { name, original: [img.w, img.h] };
    putRgb("input-canvas", p.display);
    scores = null;
    await run(-1);
  }).catch(fail);
  return busy;
}

// ------------------------------------------------------------------------------------------------
// explaining
// ------------------------------------------------------------------------------------------------
async function run(target) {
  state.state = "busy";
  status(target < 0 ? `explaining ${image.name}…` : `explaining ${className(target)}…`);
  const feeds = {
    [meta.input.name]: new ort.Tensor("float32", image.tensor, [1, C, H, W]),
    [meta.target_input]: new ort.Tensor("int64", BigInt64Array.of(BigInt(target)), [1]),
  };
  const t0 = performance.now();
  const out = await session.run(feeds, [meta.scores_output, meta.relevance_output]);
  const ms = performance.now() - t0;
  const raw = Float32Array.from(out[meta.scores_output].data);
  const rel = Float32Array.from(out[meta.relevance_output].data);
  if (scores === null) {
    const pr = lrp.probabilities(raw);
    scores = { p: pr.p, softmax: pr.softmax, raw };
    predicted = lrp.topk(raw, 1)[0];
    drawClasses();
  }
  const explained = target < 0 ? predicted : target;
  show(rel, explained, ms);
  state.runs += 1;
  state.state = "done";
}

function explain(target) {
  busy = busy.then(() => {
    if (!image) throw new Error("choose an image first");
    return run(target);
  }).catch(fail);
  return busy;
}

function show(rel, explained, ms) {
  const hm = lrp.heatmap(rel, C, H, W);
  const s = lrp.symmetricScale(hm);
  const heat = lrp.colorize(hm, s);
  const over = lrp.overlay(image.display, hm, 0.6, s);
  putRgba("heat-canvas", heat);
  putRgba("overlay-canvas", over);
  let total = 0;
  for (const v of rel) total += v;
  const p = scores.p[explained];
  $("explained").innerHTML =
    `Explaining <b>${escapeHtml(className(explained))}</b>` +
    `${explained === predicted ? " (predicted)" : ""}, ${(100 * p).toFixed(1)} %` +
    ` · relevance sum ${total >= 0 ? "+" : ""}${total.toFixed(3)}` +
    ` · ±max ${s.toPrecision(3)} · ${Math.round(ms)} ms (${backend})`;
  for (const b of document.querySelectorAll("#classes button")) {
    b.classList.toggle("active", Number(b.dataset.k) === explained);
  }
  $("any-class").value = String(explained);
  // typed arrays; state.plain() gives plain arrays (what the browser test reads back)
  state.result = {
    target: explained, relevance: rel, scores: scores.raw, probabilities: scores.p,
    top: Array.from(document.querySelectorAll("#classes button"), (b) => Number(b.dataset.k)),
    tensor: image.tensor, display: image.display, heat, overlay: over, scale: s, ms,
  };
  status(`${image.name}: ${className(explained)} explained in ${Math.round(ms)} ms`);
}

function drawClasses() {
  const top = lrp.topk(scores.p, Math.min(5, scores.p.length));
  const list = $("classes");
  list.innerHTML = "";
  for (const k of top) {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.k = String(k);
    const pct = 100 * scores.p[k];
    b.innerHTML =
      `<span class="name">${escapeHtml(className(k))}${k === predicted ? '<span class="tag">predicted</span>' : ""}</span>` +
      `<span class="p">${pct < 0.05 ? "<0.1" : pct.toFixed(1)} %</span>` +
      `<span class="bar"><span style="width:${pct.toFixed(1)}%"></span></span>`;
    b.addEventListener("click", () => explain(k));
    li.appendChild(b);
    list.appendChild(li);
  }
  $("any-class-box").hidden = $("any-class").options.length === 0;
}

// test hooks: explain a class; the last result with plain arrays; render given relevance over a given
// display image with the page's code
state.explain = (k) => explain(k);
state.plain = () => state.result && Object.fromEntries(Object.entries(state.result).map(
  ([k, v]) => [k, ArrayBuffer.isView(v) ? Array.from(v) : v]));
state.render = (relevance, display) => {
  const hm = lrp.heatmap(Float32Array.from(relevance), C, H, W);
  return { heat: Array.from(lrp.colorize(hm)), overlay: Array.from(lrp.overlay(Uint8Array.from(display), hm)) };
};

start().catch(fail);
