#!/usr/bin/env node
// Run an ONNX model (an lrponnx explainer) in headless Chromium with onnxruntime-web (wasm or
// webgpu) on .npy inputs; write every output as DIR/<name>.npy and DIR/result.json.
// A Node server on 127.0.0.1 (a free port) serves the test page, onnxruntime-web's dist folder,
// the model and the inputs, and takes the outputs back; puppeteer-core drives Debian's chromium.
// Usage: node run_browser.mjs --ep wasm|webgpu --model M.onnx --out DIR --input data=x.npy
//          --input target=t.npy [--repeat 3] [--warmup 1] [--external-data NAME=FILE]
//          [--chromium /usr/bin/chromium] [--flags "--extra --chromium --flags"] [--timeout 300]
//          [--ep-flags "..."] (replaces WASM_FLAGS / WEBGPU_FLAGS, to try other adapters)
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';
import { parseArgs } from './args.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);

// Flags for every run: no network beyond loopback, nothing from a previous profile.
export const BASE_FLAGS = ['--no-sandbox', '--disable-background-networking', '--disable-component-update',
  '--disable-sync', '--no-first-run', '--disable-quic', '--disable-default-apps', '--disable-extensions',
  '--metrics-recording-only', '--no-default-browser-check', '--disable-dev-shm-usage'];
// wasm: no GPU process work at all.
export const WASM_FLAGS = ['--disable-gpu'];
// WebGPU on a software adapter in headless Chromium 156: --enable-unsafe-webgpu alone gives Dawn's
// SwiftShader fallback adapter (even with --disable-gpu; without it requestAdapter() is null);
// --use-webgpu-adapter=swiftshader pins that adapter where a real GPU would otherwise be picked.
// (--enable-features=Vulkan --use-vulkan=swiftshader --use-angle=swiftshader change nothing here.)
export const WEBGPU_FLAGS = ['--enable-unsafe-webgpu', '--use-webgpu-adapter=swiftshader'];

const TYPES = { '.html': 'text/html', '.mjs': 'text/javascript', '.js': 'text/javascript',
  '.wasm': 'application/wasm', '.json': 'application/json' };

function serve(files, outDir) {
  const ortDist = path.join(here, 'node_modules', 'onnxruntime-web', 'dist');
  const server = http.createServer((req, res) => {
    const url = decodeURIComponent(new URL(req.url, 'http://x').pathname);
    // cross-origin isolation: SharedArrayBuffer, so wasm may use threads
    res.setHeader('Cross-Origin-Opener-Policy', 'same-origin');
    res.setHeader('Cross-Origin-Embedder-Policy', 'require-corp');
    res.setHeader('Cache-Control', 'no-store');
    if (req.method === 'POST' && url.startsWith('/out/')) {
      const name = path.basename(url.slice(5));
      const chunks = [];
      req.on('data', c => chunks.push(c));
      req.on('end', () => { fs.writeFileSync(path.join(outDir, name), Buffer.concat(chunks)); res.end('ok'); });
      return;
    }
    let file = null;
    if (url === '/' || url === '/page.html') file = path.join(here, 'page.html');
    else if (url === '/page.mjs' || url === '/npy.mjs') file = path.join(here, url.slice(1));
    else if (url.startsWith('/ort/')) file = path.join(ortDist, path.basename(url));
    else if (url.startsWith('/files/')) file = files[url.slice(7)] ?? null;
    if (!file || !fs.existsSync(file)) { res.statusCode = 404; res.end('not found'); return; }
    res.setHeader('Content-Type', TYPES[path.extname(file)] ?? 'application/octet-stream');
    fs.createReadStream(file).pipe(res);
  });
  return new Promise(resolve => server.listen(0, '127.0.0.1', () => resolve(server)));
}

async function main() {
  const a = parseArgs(process.argv.slice(2), { ep: 'wasm', chromium: '/usr/bin/chromium', flags: '',
                                               timeout: '300', 'external-data': '',
                                               'ep-flags': null });
  fs.mkdirSync(a.out, { recursive: true });
  const files = { model: path.resolve(a.model) };
  const inputs = {};
  Object.entries(a.inputs).forEach(([name, f], i) => { files[`in${i}`] = path.resolve(f); inputs[name] = `/files/in${i}`; });
  const externalData = [];
  if (a['external-data']) {
    const [name, f] = a['external-data'].split('=');
    files.ext0 = path.resolve(f);
    externalData.push({ path: name, data: '/files/ext0' });
  }
  const epFlags = a['ep-flags'] !== null ? a['ep-flags'].split(' ').filter(Boolean)
    : (a.ep === 'webgpu' ? WEBGPU_FLAGS : WASM_FLAGS);
  const flags = [...BASE_FLAGS, ...epFlags,
                 ...a.flags.split(' ').filter(Boolean)];
  const result = { runtime: 'chromium', ep: a.ep, flags };
  const log = [];
  const server = await serve(files, a.out);
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'lrponnx-chromium-'));
  let browser;
  const timer = setTimeout(() => {
    result.error = `timed out after ${a.timeout} s`;
    finish(3);
  }, Number(a.timeout) * 1000);
  async function finish(code) {
    clearTimeout(timer);
    result.browser_log = log.slice(-40);
    fs.writeFileSync(path.join(a.out, 'result.json'), JSON.stringify(result, null, 1));
    try { if (browser) await browser.close(); } catch { /* already gone */ }
    server.close();
    fs.rmSync(userDataDir, { recursive: true, force: true });
    if (result.error) console.error(`run_browser: error: ${result.error}`);
    process.exit(code);
  }
  try {
    const puppeteer = require('puppeteer-core');
    browser = await puppeteer.launch({ executablePath: a.chromium, headless: true, args: flags, userDataDir,
                                        protocolTimeout: Number(a.timeout) * 1000 });
    result.browser_version = await browser.version();
    const page = await browser.newPage();
    page.on('console', m => log.push(`${m.type()}: ${m.text()}`));
    page.on('pageerror', e => log.push(`pageerror: ${e.message}`));
    const { port } = server.address();
    await page.goto(`http://127.0.0.1:${port}/page.html`, { waitUntil: 'load' });
    await page.waitForFunction(() => typeof window.runExplainer === 'function', { timeout: 30000 });
    const cfg = { ep: a.ep, model: '/files/model', inputs, outputs: a.outputs, repeat: a.repeat, warmup: a.warmup,
                  opt: a.opt, threads: a.threads, externalData };
    Object.assign(result, await page.evaluate(c => window.runExplainer(c), cfg));
    result.flags = flags;
  } catch (e) {
    result.error = String(e && e.message ? e.message : e);
  }
  await finish(result.error ? 1 : 0);
}

main().catch(e => { console.error(`run_browser: error: ${e.message ?? e}`); process.exit(2); });
