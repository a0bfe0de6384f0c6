"""Writes half_dtypes.safetensors: a few tiny tensors in the dtypes that
xtuner-model's checkpoint reader converts, written by Python's safetensors
library (0.8) with the bit patterns computed by numpy, independently of the
Rust code under test.

Tensors:
  f16           float16 [2,3]  values exactly representable in f16
  f16_as_f32    float32 [2,3]  the same values
  bf16          bfloat16 [2,3] `bf16_source` rounded to nearest even (as torch's .to(torch.bfloat16))
  bf16_source   float32 [2,3]  values not all representable in bf16
  bf16_as_f32   float32 [2,3]  the bf16 values widened back to f32
  f64           float64 [3]
  i32           int32 [4]
  u8            uint8 [3]
  mask          bool [3]

Run: python3 make_half_dtypes.py   (needs numpy and safetensors >= 0.8)
"""

import numpy as np
import safetensors

f16_values = np.array([[0.5, -1.25, 3.0], [65504.0, 6.103515625e-05, -0.0]], dtype=np.float32)
bf16_source = np.array([[1.0, -2.5, 3.14159265], [1.0e-3, 3.0e38, -123.456]], dtype=np.float32)


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounding = ((bits >> 16) & 1) + 0x7FFF  # round half to even
    return ((bits + rounding) >> 16).astype(np.uint16)


bf16_bits = to_bf16_bits(bf16_source)
bf16_as_f32 = (bf16_bits.astype(np.uint32) << 16).view(np.float32)

arrays = {
    "f16": ("float16", f16_values.astype(np.float16)),
    "f16_as_f32": ("float32", f16_values),
    "bf16": ("bfloat16", bf16_bits),
    "bf16_source": ("float32", bf16_source),
    "bf16_as_f32": ("float32", bf16_as_f32),
    "f64": ("float64", np.array([0.1, -2.0, 1e300], dtype=np.float64)),
    "i32": ("int32", np.array([-7, 0, 1, 2147483647], dtype=np.int32)),
    "u8": ("uint8", np.array([0, 1, 255], dtype=np.uint8)),
    "mask": ("bool", np.array([True, False, True], dtype=np.bool_)),
}
arrays = {k: (d, np.ascontiguousarray(a)) for k, (d, a) in arrays.items()}
specs = {
    name: safetensors.TensorSpec(
        dtype=dtype, shape=list(a.shape), data_ptr=a.ctypes.data, data_len=a.nbytes
    )
    for name, (dtype, a) in arrays.items()
}
with open("half_dtypes.safetensors", "wb") as f:
    f.write(safetensors.serialize(specs, {"format": "pt"}))
