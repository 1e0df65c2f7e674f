// A small typed builder for ONNX models. Models in src/models/ are TypeScript functions that call it, the way
// a PyTorch module calls torch ops; the result is an ONNX ModelProto (encoded with onnx-proto / protobufjs) whose
// large initializers point into the original .safetensors files (ONNX external data at their byte offsets).
import fs from 'node:fs';
import path from 'node:path';
import onnxProto from 'onnx-proto';
import type { DType, TensorInfo } from '../weights/safetensors.ts';

const { onnx } = onnxProto;

export type ElemType = 'float32' | 'float16' | 'bfloat16' | 'float64' | 'int64' | 'int32' | 'int8' | 'uint8' | 'bool';

export const ONNX_ELEM: Record<ElemType, number> = {
  float32: 1, uint8: 2, int8: 3, int32: 6, int64: 7, bool: 9, float16: 10, float64: 11, bfloat16: 16,
};

const ELEM_SIZE: Record<ElemType, number> = { float32: 4, float16: 2, bfloat16: 2, float64: 8, int64: 8, int32: 4, int8: 1, uint8: 1, bool: 1 };

const DTYPE_TO_ELEM: Partial<Record<DType, ElemType>> = {
  F32: 'float32', F16: 'float16', BF16: 'bfloat16', F64: 'float64', I64: 'int64', I32: 'int32', I8: 'int8', U8: 'uint8', BOOL: 'bool',
};

export function elemTypeOf(dtype: DType): ElemType {
  const e = DTYPE_TO_ELEM[dtype];
  if (!e) throw new Error(`dtype ${dtype} is not supported yet in graphs`);
  return e;
}

/** A named tensor inside the graph under construction. */
export interface Value {
  readonly name: string;
}

export type Dim = number | string;
export type AttrValue = number | string | number[] | string[] | { float: number } | { floats: number[] } | { tensor: ConstTensor };
export interface ConstTensor { type: ElemType; dims: number[]; data: Float32Array | BigInt64Array | Int32Array | Uint8Array | Uint16Array }

interface ExternalRef { info: TensorInfo; name: string }

/** ONNX opset used by every graph; com.microsoft contrib ops are available too. */
export const OPSET = 21;
export const MS_DOMAIN = 'com.microsoft';

export class Graph {
  private readonly nodes: onnxProto.onnx.INodeProto[] = [];
  private readonly inputs: onnxProto.onnx.IValueInfoProto[] = [];
  private readonly outputs: onnxProto.onnx.IValueInfoProto[] = [];
  private readonly initializers: onnxProto.onnx.ITensorProto[] = [];
  private readonly external: ExternalRef[] = [];
  private readonly weightValues = new Map<string, Value>();
  private readonly usedNames = new Set<string>();
  private counter = 0;
  /** Prefix for auto-generated names, so graphs read like the module tree when inspected (netron etc.). */
  scope = '';

  constructor(readonly name: string) {}

  /** A fresh value name under the current scope. */
  fresh(hint = 't'): string {
    let n = `${this.scope ? `${this.scope}/` : ''}${hint}_${this.counter++}`;
    while (this.usedNames.has(n)) n = `${n}_`;
    this.usedNames.add(n);
    return n;
  }

  /** Runs `fn` with names prefixed by `scope` (like a module path: `double_blocks.0.img_attn`). */
  within<T>(scope: string, fn: () => T): T {
    const prev = this.scope;
    this.scope = prev ? `${prev}/${scope}` : scope;
    try {
      return fn();
    } finally {
      this.scope = prev;
    }
  }

  input(name: string, type: ElemType, dims: Dim[]): Value {
    this.usedNames.add(name);
    this.inputs.push(valueInfo(name, type, dims));
    return { name };
  }

  /** Declares `v` a graph output named `name` (an Identity is inserted when the names differ). */
  output(v: Value, name: string, type: ElemType = 'float32', dims?: Dim[]): void {
    if (v.name !== name) {
      this.usedNames.add(name);
      this.nodes.push({ opType: 'Identity', input: [v.name], output: [name], name: `${name}/Identity` });
    }
    this.outputs.push(valueInfo(name, type, dims));
  }

  /**
   * A checkpoint tensor as an initializer stored in place in its .safetensors file. `as` converts it inside the
   * graph (e.g. bf16 → float32, since ORT's CPU MatMul has no bf16 kernel). Repeated calls share one initializer.
   */
  weight(info: TensorInfo, as?: ElemType): Value {
    const elem = elemTypeOf(info.dtype);
    const key = `${info.file}:${info.name}:${as ?? elem}`;
    const cached = this.weightValues.get(key);
    if (cached) return cached;
    let name = info.name;
    while (this.usedNames.has(name)) name = `${name}_`;
    this.usedNames.add(name);
    this.initializers.push({
      name,
      dataType: ONNX_ELEM[elem],
      dims: info.shape,
      dataLocation: onnx.TensorProto.DataLocation.EXTERNAL,
      externalData: [], // filled in by serialize(), once the model's folder is known
    });
    this.external.push({ info, name });
    let v: Value = { name };
    if (as && as !== elem) v = this.op('Cast', [v], { to: ONNX_ELEM[as] }, { hint: `${name}_${as}` });
    this.weightValues.set(key, v);
    return v;
  }

  /**
   * An initializer whose bytes the session receives in memory, from `location` in its `externalData` option
   * (`InferenceSession.create(model, {externalData: [{path: location, data}]})`): weights converted at load time.
   */
  inMemoryWeight(name: string, type: ElemType, dims: number[], location: string, offset = 0): Value {
    if (this.usedNames.has(name)) throw new Error(`initializer name ${name} is already used`);
    this.usedNames.add(name);
    const length = dims.reduce((a, b) => a * b, 1) * ELEM_SIZE[type];
    this.initializers.push({
      name,
      dataType: ONNX_ELEM[type],
      dims,
      dataLocation: onnx.TensorProto.DataLocation.EXTERNAL,
      externalData: [
        { key: 'location', value: location },
        { key: 'offset', value: String(offset) },
        { key: 'length', value: String(length) },
      ],
    });
    return { name };
  }

  /** A small tensor embedded in the model (constants, RoPE tables, reshape targets). */
  const(t: ConstTensor, hint = 'const'): Value {
    const name = this.fresh(hint);
    this.initializers.push(tensorProto(name, t));
    return { name };
  }

  constF32(values: ArrayLike<number>, dims: number[] = [values.length], hint = 'const'): Value {
    return this.const({ type: 'float32', dims, data: Float32Array.from(values) }, hint);
  }

  constI64(values: ArrayLike<number | bigint>, dims: number[] = [values.length], hint = 'shape'): Value {
    return this.const({ type: 'int64', dims, data: BigInt64Array.from(Array.from(values, (v) => BigInt(v))) }, hint);
  }

  scalarF32(v: number): Value {
    return this.constF32([v], [], 'scalar');
  }

  /** Adds a node; returns its single output. Pass `null` for an omitted optional input. */
  op(type: string, inputs: Array<Value | null>, attrs: Record<string, AttrValue> = {}, opts: { domain?: string; hint?: string } = {}): Value {
    return this.opN(type, inputs, 1, attrs, opts)[0];
  }

  /** Adds a node with `nOut` outputs. */
  opN(type: string, inputs: Array<Value | null>, nOut: number, attrs: Record<string, AttrValue> = {}, opts: { domain?: string; hint?: string } = {}): Value[] {
    const outs = Array.from({ length: nOut }, () => ({ name: this.fresh(opts.hint ?? type) }));
    this.nodes.push({
      opType: type,
      domain: opts.domain ?? '',
      name: `${outs[0].name}/${type}`,
      input: inputs.map((v) => (v ? v.name : '')),
      output: outs.map((o) => o.name),
      attribute: Object.entries(attrs).map(([k, v]) => attribute(k, v)),
    });
    return outs;
  }

  /** Weight files (real paths) this graph references. */
  get weightFiles(): string[] {
    return [...new Set(this.external.map((e) => fs.realpathSync(e.info.file)))];
  }

  /**
   * Encodes the model. External data locations are written relative to `modelDir`, which must contain every
   * weight file (ORT rejects absolute paths and paths that leave the model's folder). `linked` maps a weight
   * file's real path to another name for the same bytes inside `modelDir` (a hard link, for read-only folders).
   */
  serialize(modelDir: string, linked?: ReadonlyMap<string, string>): Uint8Array {
    const dir = fs.realpathSync(modelDir);
    const byName = new Map(this.initializers.map((t) => [t.name, t]));
    for (const { info, name } of this.external) {
      const real = fs.realpathSync(info.file);
      const rel = path.relative(dir, linked?.get(real) ?? real);
      if (rel.startsWith('..') || path.isAbsolute(rel)) throw new Error(`weight file ${info.file} is outside the model folder ${dir}`);
      byName.get(name)!.externalData = [
        { key: 'location', value: rel.split(path.sep).join('/') },
        { key: 'offset', value: String(info.dataOffset) },
        { key: 'length', value: String(info.byteLength) },
      ];
    }
    const model = onnx.ModelProto.create({
      irVersion: 10,
      producerName: 'klein',
      opsetImport: [{ domain: '', version: OPSET }, { domain: MS_DOMAIN, version: 1 }],
      graph: {
        name: this.name,
        node: this.nodes,
        input: this.inputs,
        output: this.outputs,
        initializer: this.initializers,
      },
    });
    return onnx.ModelProto.encode(model).finish();
  }

  get nodeCount(): number {
    return this.nodes.length;
  }
}

function valueInfo(name: string, type: ElemType, dims?: Dim[]): onnxProto.onnx.IValueInfoProto {
  return {
    name,
    type: {
      tensorType: {
        elemType: ONNX_ELEM[type],
        shape: dims ? { dim: dims.map((d) => (typeof d === 'number' ? { dimValue: d } : { dimParam: d })) } : undefined,
      },
    },
  };
}

function tensorProto(name: string, t: ConstTensor): onnxProto.onnx.ITensorProto {
  const d = t.data;
  return { name, dataType: ONNX_ELEM[t.type], dims: t.dims, rawData: new Uint8Array(d.buffer, d.byteOffset, d.byteLength) };
}

function attribute(name: string, v: AttrValue): onnxProto.onnx.IAttributeProto {
  const T = onnx.AttributeProto.AttributeType;
  if (typeof v === 'number') {
    if (!Number.isInteger(v)) throw new Error(`attribute ${name}: ${v} is not an integer; use {float: ${v}}`);
    return { name, type: T.INT, i: v };
  }
  if (typeof v === 'string') return { name, type: T.STRING, s: new TextEncoder().encode(v) };
  if (Array.isArray(v)) {
    if (v.length > 0 && typeof v[0] === 'string') return { name, type: T.STRINGS, strings: (v as string[]).map((s) => new TextEncoder().encode(s)) };
    return { name, type: T.INTS, ints: v as number[] };
  }
  if ('float' in v) return { name, type: T.FLOAT, f: v.float };
  if ('floats' in v) return { name, type: T.FLOATS, floats: v.floats };
  return { name, type: T.TENSOR, t: tensorProto(name, v.tensor) };
}
