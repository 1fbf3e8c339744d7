#!/usr/bin/env node
// Run an ONNX model (an lrponnx explainer) with onnxruntime-node on .npy inputs; write every output
// as DIR/<name>.npy and DIR/result.json ({outputs, load_ms, run_ms, versions} or {error}).
// Usage: node run_node.mjs --model M.onnx --out DIR --input data=x.npy --input target=t.npy [--repeat 3]
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { parseArgs, OPT_LEVELS } from './args.mjs';
import { parseNpy, toNpy, safeName } from './npy.mjs';

const require = createRequire(import.meta.url);
const ort = require('onnxruntime-node');

async function main() {
  const a = parseArgs(process.argv.slice(2));
  fs.mkdirSync(a.out, { recursive: true });
  const result = { runtime: 'node', ep: 'cpu', versions: { 'onnxruntime-node': require('onnxruntime-node/package.json').version, node: process.version } };
  try {
    const opts = { executionProviders: ['cpu'], graphOptimizationLevel: OPT_LEVELS[a.opt] ?? 'all', logSeverityLevel: 3 };
    if (a.threads) opts.intraOpNumThreads = a.threads;
    let t0 = performance.now();
    const session = await ort.InferenceSession.create(a.model, opts);
    result.load_ms = performance.now() - t0;
    result.input_names = session.inputNames;
    const feeds = {};
    for (const [name, file] of Object.entries(a.inputs)) {
      const t = parseNpy(fs.readFileSync(file));
      feeds[name] = new ort.Tensor(t.type, t.data, t.dims);
    }
    const unknown = Object.keys(feeds).filter(n => !session.inputNames.includes(n));
    if (unknown.length) throw new Error(`input(s) ${unknown.join(', ')} are not inputs of the session (${session.inputNames.join(', ')})`);
    const fetches = a.outputs ?? session.outputNames;
    let out;
    result.run_ms = [];
    for (let i = 0; i < a.warmup + a.repeat; i++) {
      t0 = performance.now();
      out = await session.run(feeds, fetches);
      if (i >= a.warmup) result.run_ms.push(performance.now() - t0);
    }
    result.outputs = {};
    for (const name of fetches) {
      const file = safeName(name) + '.npy';
      fs.writeFileSync(path.join(a.out, file), toNpy(out[name]));
      result.outputs[name] = file;
    }
    await session.release();
  } catch (e) {
    result.error = String(e && e.message ? e.message : e);
  }
  fs.writeFileSync(path.join(a.out, 'result.json'), JSON.stringify(result, null, 1));
  if (result.error) { console.error(`run_node: error: ${result.error}`); process.exit(1); }
}

main().catch(e => { console.error(`run_node: error: ${e.message ?? e}`); process.exit(2); });
