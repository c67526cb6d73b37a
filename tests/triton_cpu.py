"""mamba-ssm's Triton kernels executed on a CPU by Triton's interpreter (TRITON_INTERPRET=1): the same
kernel source the GPU compiles, run program by program in NumPy. Import this module before mamba-ssm's
ops are imported, in a process of its own (tests/test_triton_tier.py starts one): Triton chooses the
interpreter when a kernel is defined, and the stand-ins below change torch.cuda and triton for the
whole process.

The kernels are written for CUDA; what they ask of the CUDA runtime is stood in for here, and nothing
of it reaches pixelvit.py:
* `torch.cuda.device(index)`, which the ops enter around every launch, is a no-op for CPU tensors
  (whose index is None), and `torch.cuda.get_device_properties` reports an H100's 132 SMs, which a few
  backward launches use to size their grids;
* every `triton.autotune` keeps one configuration (the first of the kernel's list): the interpreter
  would time each configuration in turn, and the timings would mean nothing;
* Triton 3.6's interpreter turns a loop bound into a Python int with int() of a one-element array,
  which NumPy 2 refuses; it is squeezed first, as Triton 3.8 does;
* `tl.dot` of bfloat16 tiles is computed from float32 copies: the interpreter stores bfloat16 as raw
  16-bit integers and would multiply the bits. Products of bf16 values are exact in float32, and the
  kernels accumulate in float32, as the GPU's tensor cores do.
"""
import contextlib
import os
import types

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

H100_SMS = 132


def _cuda_device(index):
    if index is None:                      # a CPU tensor's .device.index
        return contextlib.nullcontext()
    raise RuntimeError(f"triton_cpu: a kernel asked for CUDA device {index} on a CPU run")


def _device_properties(device=None):
    return types.SimpleNamespace(multi_processor_count=H100_SMS, name="interpreter")


torch.cuda.device = _cuda_device
torch.cuda.get_device_properties = _device_properties

_autotune = triton.autotune


def _one_config_autotune(configs, *args, **kwargs):
    return _autotune(configs[:1], *args, **kwargs)


triton.autotune = _one_config_autotune

_create_dot = interpreter.InterpreterBuilder.create_dot


def _widened(handle):
    if handle.dtype.scalar != tl.bfloat16:
        return handle
    data = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
    return interpreter.TensorHandle(data, tl.float32)


def _create_dot_widening_bf16(self, a, b, d, *args, **kwargs):
    return _create_dot(self, _widened(a), _widened(b), d, *args, **kwargs)


interpreter.InterpreterBuilder.create_dot = _create_dot_widening_bf16

_patch_lang_tensor = interpreter._patch_lang_tensor


def _patch_lang_tensor_numpy2(tensor, scope):
    """Triton 3.6's interpreter converts a loop bound with int() of a one-element array, which NumPy 2
    refuses (Triton 3.8 squeezes it first, as here)."""
    _patch_lang_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))


interpreter._patch_lang_tensor = _patch_lang_tensor_numpy2


def interpreting(kernel):
    """Whether a kernel, as a module defines it (jitted, perhaps inside an autotuner or heuristics),
    runs in the interpreter."""
    while not isinstance(kernel, interpreter.InterpretedFunction) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return isinstance(kernel, interpreter.InterpretedFunction)
