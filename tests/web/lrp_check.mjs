// Runs lrponnx/app/web/static/lrp.js on the cases in a JSON file (argv[2]) and writes what it computes as
// JSON to argv[3]; tests/test_web.py compares the numbers with lrponnx's Python (Pillow, numpy).
import { readFileSync, writeFileSync } from "node:fs";
import { pathToFileURL } from "node:url";
import path from "node:path";

const here = path.dirname(new URL(import.meta.url).pathname);
const lrp = await import(pathToFileURL(path.join(here, "..", "..", "lrponnx", "app", "web", "static", "lrp.js")).href);
const cases = JSON.parse(readFileSync(process.argv[2], "utf8"));
const b64 = (a) => Buffer.from(a.buffer, a.byteOffset, a.byteLength).toString("base64");
const unb64 = (s) => new Uint8Array(Buffer.from(s, "base64"));
const out = { lut: Array.from(lrp.COLDNHOT), cases: [] };
for (const c of cases) {
  const r = { name: c.name };
  if (c.kind === "preprocess") {
    let rgb = unb64(c.pixels);
    if (c.rgba) rgb = lrp.rgbaToRgb(rgb, c.w * c.h);
    const p = lrp.preprocess(rgb, c.w, c.h, c.pre);
    r.tensor = b64(p.tensor); r.display = b64(p.display); r.w = p.w; r.h = p.h;
  } else if (c.kind === "render") {
    const rel = new Float32Array(unb64(c.relevance).buffer);
    const hm = lrp.heatmap(rel, c.c, c.h, c.w);
    r.heat = b64(lrp.colorize(hm));
    r.overlay = b64(lrp.overlay(unb64(c.display), hm));
  } else if (c.kind === "probabilities") {
    const p = lrp.probabilities(c.scores);
    r.p = Array.from(p.p); r.softmax = p.softmax; r.top = lrp.topk(p.p, 5);
  }
  out.cases.push(r);
}
writeFileSync(process.argv[3], JSON.stringify(out));
