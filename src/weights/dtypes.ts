// Element types of graph values and weights, and how they map onto ONNX's numbers and the safetensors dtypes.
import type { DType } from './safetensors.ts';

export type ElemType = 'float32' | 'float16' | 'bfloat16' | 'float64' | 'int64' | 'int32' | 'int16' | 'int8' | 'uint8' | 'bool';

export const ONNX_ELEM: Record<ElemType, number> = {
  float32: 1, uint8: 2, int8: 3, int16: 5, int32: 6, int64: 7, bool: 9, float16: 10, float64: 11, bfloat16: 16,
};

export const ELEM_SIZE: Record<ElemType, number> = { float32: 4, float16: 2, bfloat16: 2, float64: 8, int64: 8, int32: 4, int16: 2, int8: 1, uint8: 1, bool: 1 };

const DTYPE_TO_ELEM: Partial<Record<DType, ElemType>> = {
  F32: 'float32', F16: 'float16', BF16: 'bfloat16', F64: 'float64', I64: 'int64', I32: 'int32', I8: 'int8', U8: 'uint8', BOOL: 'bool',
};

/** The graph element type of a stored dtype. */
export function elemTypeOf(dtype: DType): ElemType {
  const e = DTYPE_TO_ELEM[dtype];
  if (!e) throw new Error(`dtype ${dtype} is not supported in graphs`);
  return e;
}
