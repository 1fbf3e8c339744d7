// Shared command line of run_node.mjs and run_browser.mjs.
export const USAGE = `--model EXPLAINER.onnx --out DIR --input NAME=FILE.npy [--input ...]
  [--outputs a,b] [--repeat N] [--warmup N] [--opt disabled|basic|extended|all] [--threads N]`;

export function parseArgs(argv, extra = {}) {
  const a = { inputs: {}, outputs: null, repeat: 1, warmup: 0, opt: 'all', threads: 0, ...extra };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    const v = () => { if (i + 1 >= argv.length) throw new Error(`${k} needs a value`); return argv[++i]; };
    if (k === '--model') a.model = v();
    else if (k === '--out') a.out = v();
    else if (k === '--input') { const s = v(); const j = s.indexOf('='); if (j < 1) throw new Error(`--input NAME=FILE, got ${s}`); a.inputs[s.slice(0, j)] = s.slice(j + 1); }
    else if (k === '--outputs') a.outputs = v().split(',').filter(Boolean);
    else if (k === '--repeat') a.repeat = Number(v());
    else if (k === '--warmup') a.warmup = Number(v());
    else if (k === '--opt') a.opt = v();
    else if (k === '--threads') a.threads = Number(v());
    else if (k in extra || k.replace(/^--/, '') in extra) a[k.replace(/^--/, '')] = v();
    else throw new Error(`unknown argument ${k}; usage: ${USAGE}`);
  }
  if (!a.model || !a.out) throw new Error(`--model and --out are required; usage: ${USAGE}`);
  return a;
}

export const OPT_LEVELS = { disabled: 'disabled', basic: 'basic', extended: 'extended', all: 'all' };
