// Where the golden vectors live (test/golden/, see its README): every test finds them through this one constant.
import path from 'node:path';

export const GOLDEN_DIR = path.resolve(import.meta.dirname, 'golden');
