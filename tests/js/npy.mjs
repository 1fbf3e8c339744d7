// Minimal .npy (format 1.0 / 2.0) reader and writer, shared by the Node runner and the test page.
// Little-endian, C order only; the dtypes an explainer takes or returns.
const DTYPES = {
  '<f4': ['float32', Float32Array], '<f8': ['float64', Float64Array], '<i8': ['int64', BigInt64Array],
  '<i4': ['int32', Int32Array], '<i2': ['int16', Int16Array], '|i1': ['int8', Int8Array],
  '<u8': ['uint64', BigUint64Array], '<u4': ['uint32', Uint32Array], '<u2': ['uint16', Uint16Array],
  '|u1': ['uint8', Uint8Array], '|b1': ['bool', Uint8Array], '<f2': ['float16', Uint16Array],
};
const DESCR = Object.fromEntries(Object.entries(DTYPES).map(([d, [t]]) => [t, d]));

/** Parse .npy bytes (ArrayBuffer or Uint8Array) -> {type, dims, data} (type as onnxruntime names it). */
export function parseNpy(bytes) {
  const u8 = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  if (u8[0] !== 0x93 || String.fromCharCode(...u8.subarray(1, 6)) !== 'NUMPY') throw new Error('not a .npy file');
  const major = u8[6];
  const dv = new DataView(u8.buffer, u8.byteOffset, u8.byteLength);
  const hlen = major === 1 ? dv.getUint16(8, true) : dv.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder('latin1').decode(u8.subarray(start, start + hlen));
  const descr = /'descr':\s*'([^']+)'/.exec(header)[1];
  if (/'fortran_order':\s*True/.test(header)) throw new Error('.npy in Fortran order is not supported');
  const dims = /'shape':\s*\(([^)]*)\)/.exec(header)[1].split(',').map(s => s.trim()).filter(Boolean).map(Number);
  if (!(descr in DTYPES)) throw new Error(`.npy dtype ${descr} is not supported`);
  const [type, Ctor] = DTYPES[descr];
  const count = dims.reduce((a, b) => a * b, 1);
  const off = start + hlen;
  // a fresh, aligned copy (a Node Buffer's slice() is a view into a shared pool, not a copy)
  const raw = new Uint8Array(count * Ctor.BYTES_PER_ELEMENT);
  raw.set(u8.subarray(off, off + raw.length));
  if (u8.length < off + raw.length) throw new Error('.npy file is truncated');
  const data = new Ctor(raw.buffer, 0, count);
  return { type: type === 'bool' ? 'bool' : type, dims, data };
}

/** Serialise {type, dims, data} (an onnxruntime Tensor works) to .npy bytes (format 1.0). */
export function toNpy(t) {
  const descr = DESCR[t.type];
  if (!descr) throw new Error(`cannot write tensor type ${t.type} as .npy`);
  const shape = t.dims.length === 1 ? `(${t.dims[0]},)` : `(${t.dims.join(', ')})`;
  let header = `{'descr': '${descr}', 'fortran_order': False, 'shape': ${shape}, }`;
  const pad = 64 - ((10 + header.length + 1) % 64);
  header += ' '.repeat(pad % 64) + '\n';
  const hb = new TextEncoder().encode(header);
  const data = t.data;
  const body = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  const out = new Uint8Array(10 + hb.length + body.length);
  out.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0]);
  new DataView(out.buffer).setUint16(8, hb.length, true);
  out.set(hb, 10);
  out.set(body, 10 + hb.length);
  return out;
}

/** A file-system-safe name for a tensor (outputs such as lrp_out/node). */
export function safeName(name) {
  return name.replace(/[^A-Za-z0-9_.-]/g, '_');
}
