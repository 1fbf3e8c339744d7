// The test page's side of run_browser.mjs: load onnxruntime-web, run the model on the inputs the
// server holds, post every output back as .npy. Called as window.runExplainer(config).
import { parseNpy, toNpy, safeName } from '/npy.mjs';

async function fetchBytes(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`GET ${url}: ${r.status}`);
  return new Uint8Array(await r.arrayBuffer());
}

window.runExplainer = async (cfg) => {
  const result = { runtime: 'chromium', ep: cfg.ep, userAgent: navigator.userAgent,
                   crossOriginIsolated: self.crossOriginIsolated };
  try {
    if (cfg.ep === 'webgpu') {
      if (!navigator.gpu) throw new Error('navigator.gpu is undefined: this browser offers no WebGPU');
      const adapter = await navigator.gpu.requestAdapter();
      if (!adapter) throw new Error('navigator.gpu.requestAdapter() returned null: no WebGPU adapter');
      const info = adapter.info || {};
      result.adapter = { vendor: info.vendor, architecture: info.architecture, device: info.device,
                         description: info.description, isFallbackAdapter: info.isFallbackAdapter };
    }
    const ort = await import(cfg.ep === 'webgpu' ? '/ort/ort.webgpu.min.mjs' : '/ort/ort.wasm.min.mjs');
    ort.env.wasm.wasmPaths = '/ort/';
    if (cfg.threads) ort.env.wasm.numThreads = cfg.threads;
    ort.env.logLevel = 'error';
    result.versions = { 'onnxruntime-web': ort.env.versions.web };
    const opts = { executionProviders: [cfg.ep], graphOptimizationLevel: cfg.opt || 'all', logSeverityLevel: 3 };
    if (cfg.externalData && cfg.externalData.length) opts.externalData = cfg.externalData;
    const model = await fetchBytes(cfg.model);
    let t0 = performance.now();
    const session = await ort.InferenceSession.create(model, opts);
    result.load_ms = performance.now() - t0;
    result.numThreads = ort.env.wasm.numThreads;  // onnxruntime-web's choice unless --threads
    result.input_names = session.inputNames;
    const feeds = {};
    for (const [name, url] of Object.entries(cfg.inputs)) {
      const t = parseNpy(await fetchBytes(url));
      feeds[name] = new ort.Tensor(t.type, t.data, t.dims);
    }
    const unknown = Object.keys(feeds).filter(n => !session.inputNames.includes(n));
    if (unknown.length) throw new Error(`input(s) ${unknown.join(', ')} are not inputs of the session (${session.inputNames.join(', ')})`);
    const fetches = cfg.outputs || session.outputNames;
    let out;
    result.run_ms = [];
    for (let i = 0; i < (cfg.warmup || 0) + (cfg.repeat || 1); i++) {
      t0 = performance.now();
      out = await session.run(feeds, fetches);
      if (i >= (cfg.warmup || 0)) result.run_ms.push(performance.now() - t0);
    }
    result.outputs = {};
    for (const name of fetches) {
      const file = safeName(name) + '.npy';
      const r = await fetch('/out/' + encodeURIComponent(file), { method: 'POST', body: toNpy(out[name]) });
      if (!r.ok) throw new Error(`POST ${file}: ${r.status}`);
      result.outputs[name] = file;
    }
    await session.release();
  } catch (e) {
    result.error = String(e && e.message ? e.message : e);
  }
  document.getElementById('status').textContent = result.error ? 'error' : 'done';
  return result;
};
document.getElementById('status').textContent = 'ready';
