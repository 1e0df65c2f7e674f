// The import layering of klein, checked by `npm run lint:deps` (dependency-cruiser; part of `npm run lint`, which a
// full `npm test` and CI run after the type check). Type-only imports count: a layer that needs a type
// from above has the type in the wrong place.
//
// Layers, lowest first. A module may import its own layer and any layer with a lower rank, never one with the same
// rank and another name (siblings) nor a higher one.
const layers = [
  { name: 'errors', rank: 0, path: '^src/errors\\.ts$' }, // UserError: a leaf anyone may import
  { name: 'weights', rank: 1, path: '^src/weights/' },
  { name: 'graph', rank: 2, path: '^src/graph/' },
  { name: 'runtime', rank: 3, path: '^src/runtime/' },
  { name: 'models', rank: 4, path: '^src/models/' },
  { name: 'text', rank: 5, path: '^src/text/' },
  { name: 'pipeline', rank: 6, path: '^src/pipeline/' }, // the pipeline encodes prompts: it may import text
  { name: 'service', rank: 7, path: '^src/service/' },
  { name: 'conform', rank: 7, path: '^src/conform/' },
  // random checkpoints and tiny models: built from the models, used by `klein dev`, the benches and the tests
  { name: 'fixtures', rank: 8, path: '^src/fixtures/' },
  // `klein bench …` commands: they may use anything in src but the CLI, whose commands they are registered by; they
  // parse their flags as the CLI does, with its option helpers (the exceptions below)
  { name: 'bench', rank: 9, path: '^bench/' },
  { name: 'cli', rank: 10, path: '^src/cli/' },
];

// The CLI's flag helpers the benches share: parsing a target/number flag and the error that maps to exit code 2.
const cliOptionHelpers = '^src/cli/(target-options|option-parsers|errors)\\.ts$';

const anyOf = (paths) => paths.map((p) => `(${p})`).join('|');

function upwardRule(layer) {
  const forbidden = layers.filter((l) => l.rank > layer.rank || (l.rank === layer.rank && l.name !== layer.name));
  return {
    name: `${layer.name}-imports-down-only`,
    comment: `${layer.name} may import only lower layers: ${layers.filter((l) => l.rank < layer.rank).map((l) => l.name).join(', ') || 'nothing'}`,
    severity: 'error',
    from: { path: layer.path },
    to: { path: anyOf(forbidden.map((l) => l.path)), ...(layer.name === 'bench' ? { pathNot: cliOptionHelpers } : {}) },
  };
}

const srcLayers = anyOf(layers.filter((l) => l.path.startsWith('^src/')).map((l) => l.path));

module.exports = {
  forbidden: [
    {
      name: 'no-circular',
      comment: 'an import cycle: the modules on it cannot be understood, tested or loaded one without the other',
      severity: 'error',
      from: {},
      to: { circular: true },
    },
    ...layers.filter((l) => l.rank < 10).map(upwardRule),
    {
      name: 'not-to-unresolvable',
      comment: 'an import of a file or package that does not exist',
      severity: 'error',
      from: {},
      to: { couldNotResolve: true },
    },
    {
      name: 'src-module-outside-the-layers',
      comment: 'every module under src/ belongs to a layer: add its folder to the list in .dependency-cruiser.cjs',
      severity: 'error',
      from: { path: '^src/', pathNot: srcLayers },
      to: {},
    },
    {
      name: 'web-is-separate',
      comment: 'the web playground is a browser app of its own: it talks to the service over HTTP only',
      severity: 'error',
      from: { path: '^web/' },
      to: { pathNot: '^web/|^node_modules/' },
    },
    {
      name: 'nothing-imports-web',
      comment: 'the web playground is served as files, never imported',
      severity: 'error',
      from: { pathNot: '^web/' },
      to: { path: '^web/' },
    },
  ],
  options: {
    tsPreCompilationDeps: true,
    doNotFollow: { path: 'node_modules' },
    tsConfig: { fileName: 'tsconfig.json' },
    // packages' subpath imports (hono/streaming, @modelcontextprotocol/sdk/server/mcp.js) resolve by their exports
    enhancedResolveOptions: { exportsFields: ['exports'], conditionNames: ['import', 'require', 'node', 'default'] },
  },
};
