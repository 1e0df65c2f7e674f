// A Qwen3 checkpoint in an HF folder (config.json + model.safetensors, or shards with an index): the model's weights
// by their `Qwen3Model` names (`layers.0.self_attn.q_proj.weight`), whichever prefix the file uses, checked against
// the config before anything is built; and the one thing read on the host: a prompt's rows of the embedding table.
import fs from 'node:fs';
import path from 'node:path';
import type { ModelWeights } from '../../graph/nn/layers.ts';
import { bf16ToF32, Checkpoint, DTYPE_SIZE, f16ToF32, type TensorInfo } from '../../weights/safetensors.ts';
import { Qwen3ConfigError, readQwen3Config, type Qwen3Config } from './config.ts';

/**
 * The checkpoint inside an HF model folder: the sharded index or `model.safetensors` when present (the folder may
 * hold other .safetensors files, e.g. golden cases), else whatever `Checkpoint.open` finds.
 */
export function weightsPath(dir: string): string {
  for (const f of ['model.safetensors.index.json', 'model.safetensors']) {
    if (fs.existsSync(path.join(dir, f))) return path.join(dir, f);
  }
  return dir;
}

/** Every weight (name, shape implied by the config) the first `layers` decoder layers need. */
function requiredShapes(c: Qwen3Config, layers: number): Array<[string, number[]]> {
  const H = c.hiddenSize;
  const q = c.numAttentionHeads * c.headDim;
  const kv = c.numKeyValueHeads * c.headDim;
  const want: Array<[string, number[]]> = [['embed_tokens.weight', [c.vocabSize, H]]];
  for (let i = 0; i < layers; i++) {
    const p = `layers.${i}.`;
    want.push(
      [`${p}input_layernorm.weight`, [H]], [`${p}post_attention_layernorm.weight`, [H]],
      [`${p}self_attn.q_proj.weight`, [q, H]], [`${p}self_attn.k_proj.weight`, [kv, H]], [`${p}self_attn.v_proj.weight`, [kv, H]],
      [`${p}self_attn.o_proj.weight`, [H, q]], [`${p}self_attn.q_norm.weight`, [c.headDim]], [`${p}self_attn.k_norm.weight`, [c.headDim]],
      [`${p}mlp.gate_proj.weight`, [c.intermediateSize, H]], [`${p}mlp.up_proj.weight`, [c.intermediateSize, H]], [`${p}mlp.down_proj.weight`, [H, c.intermediateSize]],
    );
  }
  if (layers === c.numHiddenLayers) want.push(['norm.weight', [H]]);
  return want;
}

/** The weights of one Qwen3 checkpoint by `Qwen3Model` name; `model.` (Qwen3ForCausalLM) or no prefix in the file. */
export class Qwen3Weights implements ModelWeights {
  private constructor(
    readonly checkpoint: Checkpoint,
    /** `model.` for Qwen3ForCausalLM checkpoints, empty for bare Qwen3Model ones. */
    private readonly prefix: string,
    readonly config: Qwen3Config,
  ) {}

  /** Opens an HF Qwen3 folder (`config.json` + `model.safetensors` or a sharded index). */
  static open(folder: string): Qwen3Weights {
    const config = readQwen3Config(folder);
    const ck = Checkpoint.open(weightsPath(folder));
    const prefix = ck.has('model.embed_tokens.weight') ? 'model.' : ck.has('embed_tokens.weight') ? '' : undefined;
    if (prefix === undefined) throw new Qwen3ConfigError(`${folder}: checkpoint has no embed_tokens.weight (expected HF Qwen3 key names such as model.embed_tokens.weight)`);
    return new Qwen3Weights(ck, prefix, config);
  }

  has(name: string): boolean {
    return this.checkpoint.has(this.prefix + name);
  }

  parts(name: string): TensorInfo[] {
    return [this.checkpoint.info(this.prefix + name)];
  }

  /** Checks every weight the first `layers` layers need, so a wrong checkpoint fails before ORT does. */
  validate(layers: number): void {
    for (const [name, shape] of requiredShapes(this.config, layers)) {
      const stored = this.prefix + name;
      if (!this.checkpoint.has(stored)) throw new Qwen3ConfigError(`checkpoint is missing ${stored}`);
      const t = this.checkpoint.info(stored);
      if (t.shape.join(',') !== shape.join(',')) throw new Qwen3ConfigError(`${stored} has shape [${t.shape}], config.json implies [${shape}]`);
      if (!['F32', 'BF16', 'F16'].includes(t.dtype)) throw new Qwen3ConfigError(`${stored} has dtype ${t.dtype}; expected BF16, F16 or F32`);
    }
  }

  /**
   * The files holding what the first `layers` layers read (a 36-layer checkpoint may put the unused tail in a shard
   * of its own): the model's identity for the prompt cache.
   */
  files(layers: number): string[] {
    return [...new Set(requiredShapes(this.config, layers).map(([n]) => fs.realpathSync(this.parts(n)[0].file)))].sort();
  }

  /**
   * The embedding rows of `ids` as fp32 `[ids.length, hidden]`, read from the checkpoint: a prompt needs 512 rows
   * (2.6 MB of bf16) of Qwen3-4B's 778 MB table, so the table is never loaded nor handed to ORT.
   */
  embeddingRows(ids: BigInt64Array): Float32Array {
    const table = this.parts('embed_tokens.weight')[0];
    const [vocab, H] = table.shape;
    const rowBytes = H * DTYPE_SIZE[table.dtype];
    const out = new Float32Array(ids.length * H);
    const buf = new Uint8Array(rowBytes);
    const fd = fs.openSync(table.file, 'r');
    try {
      ids.forEach((id, i) => {
        if (id < 0n || id >= BigInt(vocab)) throw new RangeError(`token id ${id} is outside the vocabulary (0..${vocab - 1})`);
        if (fs.readSync(fd, buf, 0, rowBytes, table.dataOffset + Number(id) * rowBytes) !== rowBytes) throw new Error(`${table.file}: embedding row ${id} is cut off`);
        out.set(rowF32(buf, table.dtype), i * H);
      });
    } finally {
      fs.closeSync(fd);
    }
    return out;
  }
}

/** One stored row widened to fp32 (exact for bf16 and f16). */
function rowF32(bytes: Uint8Array, dtype: TensorInfo['dtype']): Float32Array {
  if (dtype === 'F32') return new Float32Array(bytes.buffer);
  if (dtype === 'BF16') return bf16ToF32(new Uint16Array(bytes.buffer));
  return f16ToF32(new Uint16Array(bytes.buffer));
}
