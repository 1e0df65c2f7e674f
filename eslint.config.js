// Size rules for src/ (`npm run lint:size`; part of `npm run lint`, which a full `npm test` and CI run): small
// modules with one job and functions that fit on a screen. Only these two core rules: types are tsc's job, the
// import layering dependency-cruiser's (.dependency-cruiser.cjs).
import tseslint from 'typescript-eslint';

export default [
  {
    files: ['src/**/*.ts'],
    languageOptions: { parser: tseslint.parser },
    linterOptions: { reportUnusedDisableDirectives: 'error' },
    rules: {
      'max-lines': ['error', { max: 450, skipBlankLines: true, skipComments: true }],
      'max-lines-per-function': ['error', { max: 80, skipBlankLines: true, skipComments: true }],
    },
  },
];
