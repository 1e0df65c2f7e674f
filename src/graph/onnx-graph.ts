// A small typed builder for ONNX models. Models are TypeScript functions that call it (through the layer library
// in ./nn), the way a PyTorch module calls torch ops; the result is an ONNX ModelProto (onnx-proto / protobufjs)
// whose weights are external data in files ORT maps. Every value carries its element type, so a graph can be cut
// into sessions (./partition.ts) whose inputs and outputs are declared correctly.
import onnxProto from 'onnx-proto';
import { ONNX_ELEM, type ElemType } from '../weights/dtypes.ts';
import type { WeightRef } from '../weights/weight-ref.ts';

export { ONNX_ELEM, type ElemType } from '../weights/dtypes.ts';

const { onnx } = onnxProto;

/** A named tensor inside the graph under construction. */
export interface Value {
  readonly name: string;
  readonly type: ElemType;
}

export type Dim = number | string;
export type AttrValue = number | string | number[] | string[] | { float: number } | { floats: number[] } | { tensor: ConstTensor };
export interface ConstTensor {
  type: ElemType;
  dims: number[];
  data: Float32Array | Float64Array | BigInt64Array | Int32Array | Int8Array | Uint8Array | Uint16Array;
}

/** Where the bytes of an external weight are, relative to the folder the model file is written into. */
export interface ExternalLocation {
  location: string;
  offset: number;
  length: number;
}

/** ONNX opset used by every graph; com.microsoft contrib ops are available too. */
export const OPSET = 21;
export const MS_DOMAIN = 'com.microsoft';

/** A node as the builder keeps it (the proto fields, plus the typed values for partitioning). */
export interface GraphNode {
  proto: onnxProto.onnx.INodeProto;
  inputs: Array<Value | null>;
  outputs: Value[];
  /** Partition marks active when the node was added (see `Graph.mark`). */
  marks: readonly string[];
}

export interface GraphInput {
  value: Value;
  dims?: Dim[];
}

export interface GraphOutput {
  value: Value;
  dims?: Dim[];
}

/** Output element types of ops whose output is not typed like their first input. */
function inferTypes(type: string, inputs: Array<Value | null>, attrs: Record<string, AttrValue>, nOut: number): ElemType[] {
  const first = inputs.find((v): v is Value => v !== null)?.type ?? 'float32';
  switch (type) {
    case 'Cast':
      return [elemFromOnnx(attrs.to as number)];
    case 'Shape':
    case 'Size':
    case 'NonZero':
    case 'ArgMax':
    case 'ArgMin':
      return ['int64'];
    case 'Equal':
    case 'Less':
    case 'LessOrEqual':
    case 'Greater':
    case 'GreaterOrEqual':
    case 'And':
    case 'Or':
    case 'Not':
    case 'IsNaN':
    case 'IsInf':
      return ['bool'];
    case 'Where':
      return [inputs[1]!.type];
    case 'TopK':
      return [first, 'int64'];
    case 'MatMulInteger':
      return ['int32'];
    case 'DynamicQuantizeLinear':
      return ['uint8', 'float32', 'uint8'];
    case 'QuantizeLinear':
      return [inputs[2]?.type ?? 'uint8'];
    case 'DequantizeLinear':
    case 'DynamicQuantizeMatMul':
    case 'MatMulIntegerToFloat':
    case 'MatMulNBits':
      return ['float32'];
    default:
      return Array(nOut).fill(first);
  }
}

function elemFromOnnx(n: number): ElemType {
  const e = (Object.entries(ONNX_ELEM) as Array<[ElemType, number]>).find(([, v]) => v === n);
  if (!e) throw new Error(`unknown ONNX element type ${n}`);
  return e[0];
}

export class Graph {
  readonly nodes: GraphNode[] = [];
  readonly inputs: GraphInput[] = [];
  readonly outputs: GraphOutput[] = [];
  /** Constants embedded in the model file (small: tables, shapes, scalars). */
  readonly constants = new Map<string, onnxProto.onnx.ITensorProto>();
  /** Weights stored outside the model file, by initializer name. */
  readonly weights = new Map<string, WeightRef>();
  private readonly weightByKey = new Map<string, Value>();
  private readonly usedNames = new Set<string>();
  private readonly markStack: string[] = [];
  private counter = 0;
  /** Prefix for generated names, so graphs read like the module tree when inspected (netron etc.). */
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

  /** Runs `fn` with the nodes it adds marked `mark` (a place the runtime planner may cut the graph, see partition.ts). */
  mark<T>(mark: string, fn: () => T): T {
    this.markStack.push(mark);
    try {
      return fn();
    } finally {
      this.markStack.pop();
    }
  }

  input(name: string, type: ElemType, dims?: Dim[]): Value {
    if (this.usedNames.has(name)) throw new Error(`graph ${this.name}: name ${name} is already used`);
    this.usedNames.add(name);
    const value = { name, type };
    this.inputs.push({ value, dims });
    return value;
  }

  /** Declares `v` a graph output named `name` (an Identity is inserted when the names differ). */
  output(v: Value, name: string = v.name, dims?: Dim[]): void {
    let out = v;
    if (v.name !== name) {
      if (this.usedNames.has(name)) throw new Error(`graph ${this.name}: name ${name} is already used`);
      this.usedNames.add(name);
      out = { name, type: v.type };
      this.nodes.push({ proto: { opType: 'Identity', domain: '', input: [v.name], output: [name], name: `${name}/Identity` }, inputs: [v], outputs: [out], marks: [...this.markStack] });
    }
    this.outputs.push({ value: out, dims });
  }

  /** A weight stored outside the model file (see weight-ref.ts); the same `ref.key` twice gives the same value. */
  weight(ref: WeightRef): Value {
    const known = this.weightByKey.get(ref.key);
    if (known) return known;
    let name = ref.key;
    while (this.usedNames.has(name)) name = `${name}_`;
    this.usedNames.add(name);
    this.weights.set(name, ref);
    const v = { name, type: ref.type };
    this.weightByKey.set(ref.key, v);
    return v;
  }

  /** A small tensor embedded in the model (constants, RoPE tables, reshape targets). */
  const(t: ConstTensor, hint = 'const'): Value {
    const name = this.fresh(hint);
    this.constants.set(name, tensorProto(name, t));
    return { name, type: t.type };
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
  op(type: string, inputs: Array<Value | null>, attrs: Record<string, AttrValue> = {}, opts: OpOptions = {}): Value {
    return this.opN(type, inputs, 1, attrs, opts)[0];
  }

  /** Adds a node with `nOut` outputs. */
  opN(type: string, inputs: Array<Value | null>, nOut: number, attrs: Record<string, AttrValue> = {}, opts: OpOptions = {}): Value[] {
    const types = opts.types ?? inferTypes(type, inputs, attrs, nOut);
    const outs = Array.from({ length: nOut }, (_, i) => ({ name: this.fresh(opts.hint ?? type), type: types[i] ?? types[0] }));
    this.nodes.push({
      proto: {
        opType: type,
        domain: opts.domain ?? '',
        name: `${outs[0].name}/${type}`,
        input: inputs.map((v) => (v ? v.name : '')),
        output: outs.map((o) => o.name),
        attribute: Object.entries(attrs).map(([k, v]) => attribute(k, v)),
      },
      inputs,
      outputs: outs,
      marks: [...this.markStack],
    });
    return outs;
  }

  /** `x` converted to `to` (no node when it already is). */
  cast(x: Value, to: ElemType, hint?: string): Value {
    return x.type === to ? x : this.op('Cast', [x], { to: ONNX_ELEM[to] }, { hint: hint ?? `to_${to}` });
  }

  /**
   * Encodes the model. `locate` says where each external weight's bytes are, relative to the folder the model
   * file is written into (ORT resolves external data only below the model's own folder).
   */
  serialize(locate: (ref: WeightRef) => ExternalLocation = noWeights): Uint8Array {
    const initializer: onnxProto.onnx.ITensorProto[] = [...this.constants.values()];
    for (const [name, ref] of this.weights) {
      const at = locate(ref);
      initializer.push({
        name,
        dataType: ONNX_ELEM[ref.type],
        dims: ref.dims,
        dataLocation: onnx.TensorProto.DataLocation.EXTERNAL,
        externalData: [
          { key: 'location', value: at.location },
          { key: 'offset', value: String(at.offset) },
          { key: 'length', value: String(at.length) },
        ],
      });
    }
    const model = onnx.ModelProto.create({
      irVersion: 10,
      producerName: 'klein',
      opsetImport: [{ domain: '', version: OPSET }, { domain: MS_DOMAIN, version: 1 }],
      graph: {
        name: this.name,
        node: this.nodes.map((n) => n.proto),
        input: this.inputs.map((i) => valueInfo(i.value, i.dims)),
        output: this.outputs.map((o) => valueInfo(o.value, o.dims)),
        initializer,
      },
    });
    return onnx.ModelProto.encode(model).finish();
  }

  get nodeCount(): number {
    return this.nodes.length;
  }
}

function noWeights(ref: WeightRef): never {
  throw new Error(`weight ${ref.key} needs a weight store to be serialized`);
}

export interface OpOptions {
  domain?: string;
  hint?: string;
  /** Output element types, when the builder cannot infer them (see inferTypes). */
  types?: ElemType[];
}

function valueInfo(v: Value, dims?: Dim[]): onnxProto.onnx.IValueInfoProto {
  return {
    name: v.name,
    type: {
      tensorType: {
        elemType: ONNX_ELEM[v.type],
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

export { elemFromOnnx };
