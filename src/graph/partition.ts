// Cutting one forward into several graphs, each run as its own ORT session: the runtime planner decides the pieces
// (e.g. the step-invariant part of a transformer forward, computed once per image), the model never sees them.
// A piece's inputs are the values it reads that the graph inputs or earlier pieces produce; its outputs are what
// later pieces or the caller read. Nodes that depend on constants and weights only are copied into every piece
// that needs them, so no weight-derived tensor ever travels between sessions.
import { Graph, type Value } from './onnx-graph.ts';

type Dep = 'const' | 'invariant' | 'variant';

/** Splits `g` into the part that depends only on the `invariant` inputs (and constants) and the rest. */
export function splitInvariant(g: Graph, invariant: ReadonlySet<string>): { invariant: Graph; rest: Graph } {
  const kind = new Map<string, Dep>();
  for (const name of [...g.constants.keys(), ...g.weights.keys()]) kind.set(name, 'const');
  for (const i of g.inputs) kind.set(i.value.name, invariant.has(i.value.name) ? 'invariant' : 'variant');
  const assign: Array<0 | 1 | null> = g.nodes.map((n) => {
    const deps = n.inputs.filter((v): v is Value => v !== null).map((v) => kind.get(v.name) ?? 'variant');
    const k: Dep = deps.includes('variant') ? 'variant' : deps.includes('invariant') ? 'invariant' : 'const';
    for (const o of n.outputs) kind.set(o.name, k);
    return k === 'const' ? null : k === 'invariant' ? 0 : 1;
  });
  const [a, b] = partition(g, assign, 2, [`${g.name}.invariant`, g.name]);
  return { invariant: a, rest: b };
}

/**
 * Builds `count` graphs from `g`: node i goes to piece `assign[i]` (non-decreasing along every data dependency),
 * or, when null (constant-only nodes), to every piece that reads its output.
 */
export function partition(g: Graph, assign: ReadonlyArray<number | null>, count: number, names: string[]): Graph[] {
  const producer = new Map<string, number>(); // value → node index
  g.nodes.forEach((n, i) => n.outputs.forEach((o) => producer.set(o.name, i)));
  // which pieces need each constant-only node (propagated backwards through constant chains)
  const needs: Array<Set<number>> = g.nodes.map(() => new Set());
  for (let i = g.nodes.length - 1; i >= 0; i--) {
    const pieces = assign[i] === null ? needs[i] : new Set([assign[i] as number]);
    for (const v of g.nodes[i].inputs) {
      const p = v ? producer.get(v.name) : undefined;
      if (p !== undefined && assign[p] === null) for (const k of pieces) needs[p].add(k);
    }
  }
  const graphOutputs = new Set(g.outputs.map((o) => o.value.name));
  const pieceOf = (i: number): number[] => (assign[i] === null ? [...needs[i]] : [assign[i] as number]);
  // the latest piece that reads each value (graph outputs count as read by the caller, after the last piece)
  const lastReader = new Map<string, number>();
  g.nodes.forEach((n, i) => {
    for (const v of n.inputs) if (v) for (const p of pieceOf(i)) lastReader.set(v.name, Math.max(lastReader.get(v.name) ?? -1, p));
  });
  for (const name of graphOutputs) lastReader.set(name, count);
  return names.map((name, piece) => {
    const sub = new Graph(name);
    const indices = g.nodes.map((_, i) => i).filter((i) => pieceOf(i).includes(piece));
    const nodes = indices.map((i) => g.nodes[i]);
    const produced = new Set(nodes.flatMap((n) => n.outputs.map((o) => o.name)));
    const declared = new Set<string>();
    for (const n of nodes) {
      for (const v of n.inputs) {
        if (!v || produced.has(v.name) || declared.has(v.name)) continue;
        declared.add(v.name);
        if (g.constants.has(v.name)) sub.constants.set(v.name, g.constants.get(v.name)!);
        else if (g.weights.has(v.name)) sub.weights.set(v.name, g.weights.get(v.name)!);
        else sub.inputs.push({ value: v, dims: g.inputs.find((i) => i.value.name === v.name)?.dims });
      }
      sub.nodes.push(n);
    }
    for (const i of indices) {
      if (assign[i] === null) continue; // constant-only nodes are copied, never passed on
      for (const o of g.nodes[i].outputs) {
        if ((lastReader.get(o.name) ?? -1) > piece) sub.outputs.push({ value: o, dims: g.outputs.find((x) => x.value.name === o.name)?.dims });
      }
    }
    return sub;
  });
}
