// lrponnx web page: the numbers. No DOM here, so Node can import this file too (tests/test_web.py).
//
// Every function mirrors a Python function of lrponnx exactly (same arithmetic, same order, float64):
//   preprocess()        lrponnx.preprocess.Preprocessing.resize + apply   (Pillow's bilinear resize,
//                       RGB->L conversion and alpha compositing on white included, in integer maths)
//   heatmap()           lrponnx.render.to_heatmap(reduce="sum")
//   colorIndex()        lrponnx.render.color_index (symmetric for the diverging maps)
//   colorize()          lrponnx.render.colorize with the coldnhot lookup table (render._build_lut)
//   overlay()           lrponnx.render.overlay(alpha=0.6, weight="magnitude")

// ------------------------------------------------------------------------------------------------
// colour map: lrponnx.render._NODES["coldnhot"] -> 256 x RGB, as render._build_lut
// ------------------------------------------------------------------------------------------------
export const COLDNHOT_NODES = [
  [0, [0, 255, 255]], [64, [0, 0, 255]], [128, [0, 0, 0]],
  [170, [255, 0, 0]], [212, [255, 255, 0]], [255, [255, 255, 255]],
];

function round12(x) {
  // numpy's round(12): x * 1e12 rounded half to even, divided back
  const y = x * 1e12;
  let r = Math.round(y);
  if (Math.abs(y % 1) === 0.5 && r % 2 !== 0) r -= 1;
  return r / 1e12;
}

export function buildLut(nodes = COLDNHOT_NODES) {
  const lut = new Uint8Array(256 * 3);
  for (let k = 0; k < 256; k++) {
    let j = 0;
    while (j < nodes.length - 2 && k > nodes[j + 1][0]) j++;
    const [i0, c0] = nodes[j];
    const [i1, c1] = nodes[j + 1];
    for (let c = 0; c < 3; c++) {
      // numpy.interp: fp[j] + (x - xp[j]) * slope, slope = (fp[j+1] - fp[j]) / (xp[j+1] - xp[j])
      const slope = (c1[c] - c0[c]) / (i1 - i0);
      let v = k === i1 ? c1[c] : c0[c] + (k - i0) * slope;
      v = Math.floor(Math.min(255, Math.max(0, round12(v))));
      lut[k * 3 + c] = v;
    }
  }
  return lut;
}

export const COLDNHOT = buildLut();

// ------------------------------------------------------------------------------------------------
// Pillow (Resample.c, Convert.c, AlphaComposite.c) in integer maths, for RGB(A) uint8 images
// ------------------------------------------------------------------------------------------------
const PRECISION_BITS = 32 - 8 - 2;

function bilinearCoeffs(inSize, outSize) {
  // precompute_coeffs + normalize_coeffs_8bpc, bilinear filter (support 1)
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1.0);
  const support = 1.0 * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const kk = new Int32Array(outSize * ksize);
  const w = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1.0 / filterscale;
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    let ww = 0.0;
    for (let x = 0; x < xmax; x++) {
      let t = Math.abs((x + xmin - center + 0.5) * ss);
      const v = t < 1.0 ? 1.0 - t : 0.0;
      w[x] = v;
      ww += v;
    }
    for (let x = 0; x < ksize; x++) {
      let v = x < xmax ? (ww !== 0.0 ? w[x] / ww : w[x]) : 0;
      kk[xx * ksize + x] = v < 0 ? Math.trunc(-0.5 + v * (1 << PRECISION_BITS))
                                 : Math.trunc(0.5 + v * (1 << PRECISION_BITS));
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, bounds, kk };
}

function clip8(v) {
  if (v >= (1 << PRECISION_BITS) * 256) return 255;
  if (v <= 0) return 0;
  return Math.floor(v / (1 << PRECISION_BITS));
}

/** Pillow's Image.resize((outW, outH), BILINEAR) of an RGB image (Uint8Array, 3 bytes a pixel): the
 * horizontal pass, rounded to uint8, then the vertical pass, as Pillow <= 12 always does. Pillow 13 runs
 * the vertical pass first for some downscales (python-pillow/Pillow#9549); single pixels may then differ
 * by one grey level. Images already at the model's size are not resized at all. */
export function resizeBilinear(rgb, inW, inH, outW, outH) {
  let src = rgb, w = inW, h = inH;
  if (outW !== inW) {  // horizontal pass
    const { ksize, bounds, kk } = bilinearCoeffs(inW, outW);
    const dst = new Uint8Array(outW * h * 3);
    for (let y = 0; y < h; y++) {
      for (let xx = 0; xx < outW; xx++) {
        const xmin = bounds[xx * 2], xmax = bounds[xx * 2 + 1];
        for (let c = 0; c < 3; c++) {
          let ss = 1 << (PRECISION_BITS - 1);
          for (let x = 0; x < xmax; x++) ss += src[(y * w + x + xmin) * 3 + c] * kk[xx * ksize + x];
          dst[(y * outW + xx) * 3 + c] = clip8(ss);
        }
      }
    }
    src = dst; w = outW;
  }
  if (outH !== inH) {  // vertical pass
    const { ksize, bounds, kk } = bilinearCoeffs(inH, outH);
    const dst = new Uint8Array(w * outH * 3);
    for (let yy = 0; yy < outH; yy++) {
      const ymin = bounds[yy * 2], ymax = bounds[yy * 2 + 1];
      for (let x = 0; x < w; x++) {
        for (let c = 0; c < 3; c++) {
          let ss = 1 << (PRECISION_BITS - 1);
          for (let y = 0; y < ymax; y++) ss += src[((y + ymin) * w + x) * 3 + c] * kk[yy * ksize + y];
          dst[(yy * w + x) * 3 + c] = clip8(ss);
        }
      }
    }
    src = dst; h = outH;
  }
  return src === rgb ? Uint8Array.from(rgb) : src;
}

/** RGBA (canvas ImageData, not premultiplied) -> RGB: transparent pixels composited on white exactly as
 * Pillow's Image.alpha_composite(white, rgba) does (lrponnx.preprocess.read_rgb). */
export function rgbaToRgb(rgba, n) {
  const out = new Uint8Array(n * 3);
  const PB = 7;
  const div255 = (a) => (((a >>> 8) + a) >>> 8);
  for (let i = 0; i < n; i++) {
    const a = rgba[i * 4 + 3];
    if (a === 255) {
      out[i * 3] = rgba[i * 4]; out[i * 3 + 1] = rgba[i * 4 + 1]; out[i * 3 + 2] = rgba[i * 4 + 2];
      continue;
    }
    // dst = opaque white
    const blend = 255 * (255 - a);
    const outa255 = a * 255 + blend;
    const coef1 = Math.floor((a * 255 * 255 * (1 << PB)) / outa255);
    const coef2 = 255 * (1 << PB) - coef1;
    for (let c = 0; c < 3; c++) {
      const tmp = rgba[i * 4 + c] * coef1 + 255 * coef2;
      out[i * 3 + c] = div255(tmp + (0x80 << PB)) >>> PB;
    }
  }
  return out;
}

/** Pillow's convert("L") of an RGB image: L = (19595 R + 38470 G + 7471 B + 0x8000) >> 16. */
export function rgbToGray(rgb, n) {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) {
    out[i] = (rgb[i * 3] * 19595 + rgb[i * 3 + 1] * 38470 + rgb[i * 3 + 2] * 7471 + 0x8000) >>> 16;
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// preprocessing (lrponnx.preprocess.Preprocessing; pre = Preprocessing.to_dict())
// ------------------------------------------------------------------------------------------------
function perChannel(values, c, fill) {
  if (values == null) return new Array(c).fill(fill);
  if (!Array.isArray(values)) return new Array(c).fill(Number(values));
  return values.length === 1 ? new Array(c).fill(values[0]) : values;
}

/** Preprocessing.resize: the image squashed to pre.size [H, W] (bilinear, as Pillow); RGB uint8. */
export function resizeToModel(rgb, w, h, pre) {
  if (!pre.size) return { rgb: Uint8Array.from(rgb), w, h };
  const [H, W] = pre.size;
  if (H === h && W === w) return { rgb: Uint8Array.from(rgb), w, h };
  return { rgb: resizeBilinear(rgb, w, h, W, H), w: W, h: H };
}

/** Preprocessing.apply on an RGB uint8 image already at the model's size -> Float32Array [C*H*W]. */
export function toTensor(rgb, w, h, pre) {
  const order = pre.channel_order;
  const c = order === "gray" ? 1 : 3;
  const gray = order === "gray" ? rgbToGray(rgb, w * h) : null;
  const x = new Float32Array(c * h * w);
  const ps = pre.pixel_scale, scale = pre.scale ?? 1.0;
  const std = perChannel(pre.std, c, 1.0);
  const mean = pre.mean;
  const meanImage = Array.isArray(mean) && Array.isArray(mean[0]);
  let top = 0, left = 0;
  if (meanImage) {  // C x H' x W' mean, centre-cropped with Caffe's offsets
    top = Math.floor((mean[0].length - h) / 2);
    left = Math.floor((mean[0][0].length - w) / 2);
    if (top < 0 || left < 0) throw new Error(`the mean image is smaller than the input ${h} x ${w}`);
  }
  const meanCh = meanImage ? null : perChannel(mean, c, 0.0);
  for (let ch = 0; ch < c; ch++) {
    const src = order === "bgr" ? 2 - ch : ch;
    for (let i = 0; i < h; i++) {
      for (let j = 0; j < w; j++) {
        const p = gray ? gray[i * w + j] : rgb[(i * w + j) * 3 + src];
        let v = (p / 255.0) * ps;
        if (!pre.embedded) {
          const m = meanImage ? mean[ch][top + i][left + j] : meanCh[ch];
          v = ((v - m) / std[ch]) * scale;
        }
        x[(ch * h + i) * w + j] = v;
      }
    }
  }
  return x;
}

/** The whole of Preprocessing.resize + apply: {tensor, display (RGB uint8 at the model's size), w, h}. */
export function preprocess(rgb, w, h, pre) {
  const r = resizeToModel(rgb, w, h, pre);
  return { tensor: toTensor(r.rgb, r.w, r.h, pre), display: r.rgb, w: r.w, h: r.h };
}

// ------------------------------------------------------------------------------------------------
// rendering (lrponnx.render)
// ------------------------------------------------------------------------------------------------
/** to_heatmap(reduce="sum"): relevance [C,H,W] (Float32Array) -> Float64Array [H*W], channels added in
 * order in float64 (numpy's sum over axis 0). */
export function heatmap(rel, c, h, w) {
  const out = new Float64Array(h * w);
  for (let i = 0; i < h * w; i++) {
    let s = rel[i];
    for (let ch = 1; ch < c; ch++) s += rel[ch * h * w + i];
    out[i] = s;
  }
  return out;
}

/** symmetric_scale(h): max |h|; throws on NaN/inf like render._as_heatmap. */
export function symmetricScale(hm) {
  let s = 0;
  for (let i = 0; i < hm.length; i++) {
    const a = Math.abs(hm[i]);
    if (!Number.isFinite(a)) throw new Error("the relevance has NaN or inf values; refusing to render it");
    if (a > s) s = a;
  }
  return s;
}

/** color_index(h, symmetric=True): floor(clip((h + s) / (2 s) * 255, 0, 255)); 127 when s == 0. */
export function colorIndex(hm, s = symmetricScale(hm)) {
  const out = new Uint8Array(hm.length);
  if (s === 0) return out.fill(127);
  const vmin = -s, vmax = s;
  for (let i = 0; i < hm.length; i++) {
    const x = (hm[i] - vmin) / (vmax - vmin);
    out[i] = Math.trunc(Math.min(255, Math.max(0, x * 255)));
  }
  return out;
}

/** colorize(h, "coldnhot") -> RGBA Uint8ClampedArray (alpha 255), ready for ImageData. */
export function colorize(hm, s = symmetricScale(hm), lut = COLDNHOT) {
  const idx = colorIndex(hm, s);
  const out = new Uint8ClampedArray(hm.length * 4);
  for (let i = 0; i < hm.length; i++) {
    out[i * 4] = lut[idx[i] * 3];
    out[i * 4 + 1] = lut[idx[i] * 3 + 1];
    out[i * 4 + 2] = lut[idx[i] * 3 + 2];
    out[i * 4 + 3] = 255;
  }
  return out;
}

function rint(x) {  // numpy.rint: round half to even
  const f = Math.floor(x), d = x - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

/** overlay(display, relevance, alpha, weight="magnitude", coldnhot): per pixel opacity alpha * |v|,
 * v = clip(h / s, -1, 1); out = rint(base (1 - w) + colour w). RGBA out. */
export function overlay(displayRgb, hm, alpha = 0.6, s = symmetricScale(hm), lut = COLDNHOT) {
  const col = colorize(hm, s, lut);
  const out = new Uint8ClampedArray(hm.length * 4);
  for (let i = 0; i < hm.length; i++) {
    const w = s === 0 ? 0 : alpha * Math.abs(Math.min(1, Math.max(-1, hm[i] / s)));
    for (let c = 0; c < 3; c++) {
      const v = displayRgb[i * 3 + c] * (1.0 - w) + col[i * 4 + c] * w;
      out[i * 4 + c] = Math.min(255, Math.max(0, rint(v)));
    }
    out[i * 4 + 3] = 255;
  }
  return out;
}

/** CSS gradient stops of the colour map (for the legend). */
export function lutGradient(lut = COLDNHOT, steps = 16) {
  const stops = [];
  for (let i = 0; i <= steps; i++) {
    const k = Math.round((i * 255) / steps);
    stops.push(`rgb(${lut[k * 3]},${lut[k * 3 + 1]},${lut[k * 3 + 2]}) ${((100 * i) / steps).toFixed(1)}%`);
  }
  return `linear-gradient(to right, ${stops.join(", ")})`;
}

// ------------------------------------------------------------------------------------------------
// scores
// ------------------------------------------------------------------------------------------------
/** Probabilities from the scores output: used as they are when they already are (each in [0, 1],
 * summing to 1 within 1e-3: a Softmax output), else softmax(scores). */
export function probabilities(scores) {
  let sum = 0, isProb = true;
  for (const v of scores) { sum += v; if (!(v >= 0 && v <= 1)) isProb = false; }
  if (isProb && Math.abs(sum - 1) < 1e-3) return { p: Float64Array.from(scores), softmax: false };
  let m = -Infinity;
  for (const v of scores) m = Math.max(m, v);
  const e = Float64Array.from(scores, (v) => Math.exp(v - m));
  const z = e.reduce((a, b) => a + b, 0);
  return { p: e.map((v) => v / z), softmax: true };
}

/** Indices of the k largest values, largest first (ties: lower index first, as a stable sort). */
export function topk(values, k) {
  const idx = Array.from(values, (_, i) => i);
  idx.sort((a, b) => (values[b] - values[a]) || (a - b));
  return idx.slice(0, k);
}
