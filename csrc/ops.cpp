// Op schemas for the rmsnorm_ext library, and the Python module `_C` that loads them.
//
// The schemas live here, in C++, so the ops exist as soon as `_C` is imported; the
// CPU kernels register in csrc/cpu/, the CUDA kernels in csrc/cuda/, and the Python
// package adds fake (meta) kernels and autograd on top.
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

// The module's methods (build_info), defined in csrc/build_info.cpp.
extern PyMethodDef rmsnorm_ext_module_methods[];

TORCH_LIBRARY(rmsnorm_ext, m) {
  // RMSNorm: y = x * rstd * (weight_offset + weight), rstd = 1 / sqrt(mean(x^2) + eps).
  // Returns (y, rstd); rstd has the input's leading (non-normalized) shape.
  m.def(
      "rms_norm_fwd(Tensor input, int[] normalized_shape, Tensor? weight, float eps, "
      "float weight_offset) -> (Tensor, Tensor)");
  // Returns (grad_input, grad_weight). grad_residual, when given, is added to
  // grad_input (the gradient that reaches a fused residual sum from its own output).
  // grad_weight is an empty tensor when compute_weight_grad is false or there is no weight.
  m.def(
      "rms_norm_bwd(Tensor grad_out, Tensor input, Tensor rstd, Tensor? weight, "
      "int[] normalized_shape, float weight_offset, Tensor? grad_residual, "
      "bool compute_weight_grad) -> (Tensor, Tensor)");
  // LayerNorm: y = (x - mean) * rstd * weight + bias. Returns (y, mean, rstd).
  m.def(
      "layer_norm_fwd(Tensor input, int[] normalized_shape, Tensor? weight, Tensor? bias, "
      "float eps) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_input, grad_weight, grad_bias); the parameter gradients are empty
  // tensors when not requested.
  m.def(
      "layer_norm_bwd(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, Tensor? weight, "
      "int[] normalized_shape, bool compute_weight_grad, bool compute_bias_grad) "
      "-> (Tensor, Tensor, Tensor)");
  // h = input + residual (in residual's dtype), y = rms_norm(h) (in input's dtype).
  // Returns (y, h, rstd). residual may be float32 while input is bfloat16/float16.
  m.def(
      "fused_add_rms_norm_fwd(Tensor input, Tensor residual, int[] normalized_shape, "
      "Tensor? weight, float eps, float weight_offset) -> (Tensor, Tensor, Tensor)");
  // In-place inference variant: residual <- input + residual, input <- rms_norm(residual).
  m.def(
      "fused_add_rms_norm_inplace(Tensor(a!) input, Tensor(b!) residual, int[] normalized_shape, "
      "Tensor? weight, float eps, float weight_offset) -> ()");
  // Norm + quantize, inference only (no autograd): y is the norm's output above in fp32,
  // out = quantize(y / s) in quant_dtype (float8_e4m3fn, float8_e5m2 or int8) with s the
  // static dequantization scale `scale` (one float32 element; scales is a copy of it), or
  // dynamic per row (group_size None) / per group of group_size elements of a row:
  // s = max(min(absmax(y), scale_ub) / qmax, min_scale), scales of shape leading + (groups,).
  m.def(
      "rms_norm_quant(Tensor input, int[] normalized_shape, Tensor? weight, float eps, "
      "float weight_offset, Tensor? scale, ScalarType quant_dtype, int? group_size, "
      "Tensor? scale_ub) -> (Tensor, Tensor)");
  // Returns (out, scales, residual_out); residual_out = input + residual as in
  // fused_add_rms_norm_fwd, and y = rms_norm(residual_out).
  m.def(
      "fused_add_rms_norm_quant(Tensor input, Tensor residual, int[] normalized_shape, "
      "Tensor? weight, float eps, float weight_offset, Tensor? scale, ScalarType quant_dtype, "
      "int? group_size, Tensor? scale_ub) -> (Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_quant(Tensor input, int[] normalized_shape, Tensor? weight, Tensor? bias, "
      "float eps, Tensor? scale, ScalarType quant_dtype, int? group_size, Tensor? scale_ub) "
      "-> (Tensor, Tensor)");
}

namespace {

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                          rmsnorm_ext_module_methods};

}  // namespace

namespace rmsnorm_ext {
int add_fast_functions(PyObject* module);  // csrc/python_fast.cpp
}

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (m && rmsnorm_ext::add_fast_functions(m) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
