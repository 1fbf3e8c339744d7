#!/usr/bin/env node
// Drive the `lrponnx web` page in headless Chromium (Debian's /usr/bin/chromium, puppeteer-core from
// tests/js/node_modules) through a list of steps, and write what the page computed as JSON.
// Usage: node drive_page.mjs --url http://127.0.0.1:PORT/ --steps steps.json --out result.json
//          [--chromium /usr/bin/chromium] [--timeout 240] [--flags "..."]
// steps.json: [{"upload": "/path/img.png"}, {"click": "#classes li:nth-child(2) button"},
//              {"render": {"relevance": [...], "display": [...]}}, {"screenshot": "/path/page.png"}, ...]
// After an upload or a click the driver waits until the page finished one more explanation
// (window.lrponnx.runs) and records window.lrponnx.result; a page error ends the run.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, "..", "js", "package.json"));

// as tests/js/run_browser.mjs: nothing but loopback, nothing from an earlier profile, no GPU
const FLAGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--no-first-run", "--disable-quic", "--disable-default-apps", "--disable-extensions", "--metrics-recording-only",
  "--no-default-browser-check", "--disable-dev-shm-usage", "--disable-gpu", "--hide-scrollbars"];

function args(argv) {
  const a = { chromium: "/usr/bin/chromium", timeout: "240", flags: "" };
  for (let i = 0; i < argv.length; i += 2) a[argv[i].replace(/^--/, "")] = argv[i + 1];
  return a;
}

async function main() {
  const a = args(process.argv.slice(2));
  const steps = JSON.parse(fs.readFileSync(a.steps, "utf8"));
  const timeout = Number(a.timeout) * 1000;
  const out = { steps: [], log: [] };
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "lrponnx-web-chromium-"));
  const puppeteer = require("puppeteer-core");
  let browser;
  try {
    browser = await puppeteer.launch({
      executablePath: a.chromium, headless: true, userDataDir, protocolTimeout: timeout,
      args: [...FLAGS, ...a.flags.split(" ").filter(Boolean)],
      defaultViewport: { width: 1280, height: 760, deviceScaleFactor: 1 },
    });
    out.browser_version = await browser.version();
    const page = await browser.newPage();
    page.on("console", (m) => out.log.push(`${m.type()}: ${m.text()}`));
    page.on("pageerror", (e) => out.log.push(`pageerror: ${e.message}`));
    await page.goto(a.url, { waitUntil: "load" });
    const t0 = Date.now();
    await page.waitForFunction(() => window.lrponnx && ["ready", "error"].includes(window.lrponnx.state),
      { timeout, polling: 100 });
    out.load_ms = Date.now() - t0;
    out.cross_origin_isolated = await page.evaluate(() => self.crossOriginIsolated);
    for (const step of steps) {
      const runs = await page.evaluate(() => window.lrponnx.runs);
      const err = await page.evaluate(() => window.lrponnx.error);
      if (err) throw new Error(`page error: ${err}`);
      if (step.upload) {
        const input = await page.$("#file");
        await input.uploadFile(step.upload);
      } else if (step.click) {
        await page.click(step.click);
      } else if (step.render) {
        const r = await page.evaluate((s) => window.lrponnx.render(s.relevance, s.display), step.render);
        out.steps.push({ render: r });
        continue;
      } else if (step.screenshot) {
        await page.screenshot({ path: step.screenshot, fullPage: true });
        out.steps.push({ screenshot: step.screenshot });
        continue;
      }
      await page.waitForFunction((n) => window.lrponnx.error || (window.lrponnx.runs > n && window.lrponnx.state === "done"),
        { timeout, polling: 50 }, runs);
      const snap = await page.evaluate(() => ({ error: window.lrponnx.error, result: window.lrponnx.plain(),
        explained: document.getElementById("explained").textContent,
        canvases: Object.fromEntries(["input-canvas", "heat-canvas", "overlay-canvas"].map((id) => {
          const c = document.getElementById(id);
          return [id, { w: c.width, h: c.height, rgba: Array.from(c.getContext("2d").getImageData(0, 0, c.width, c.height).data) }];
        })),
        classes: Array.from(document.querySelectorAll("#classes button .name"), (n) => n.firstChild.textContent) }));
      if (snap.error) throw new Error(`page error: ${snap.error}`);
      out.steps.push(snap);
    }
  } catch (e) {
    out.error = String(e && e.message ? e.message : e);
  } finally {
    if (browser) await browser.close().catch(() => {});
    fs.rmSync(userDataDir, { recursive: true, force: true });
    fs.writeFileSync(a.out, JSON.stringify(out));
  }
  process.exit(out.error ? 1 : 0);
}

main().catch((e) => { console.error(`drive_page: error: ${e.message ?? e}`); process.exit(2); });
