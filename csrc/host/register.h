// Registration of a host file's host functions for every dispatch key that reaches the host
// layer: each device this build has kernels for, and Meta (meta tensors and the fake tensors
// of torch.compile run the same checks and output shapes, host.h shapes_only). The schemas
// are defined beside them with TORCH_LIBRARY_FRAGMENT(rmsnorm_ext, m); the library itself
// (TORCH_LIBRARY) is csrc/library/module.cpp.
//
//   void register_impls(torch::Library& m) { m.impl("my_op", &my_op); }
//   RMSNORM_EXT_REGISTER_HOST(register_impls)
#pragma once

#include <torch/library.h>

#ifdef RMSNORM_EXT_WITH_CUDA
#define RMSNORM_EXT_REGISTER_HOST_CUDA(fn) \
  TORCH_LIBRARY_IMPL(rmsnorm_ext, CUDA, m) { fn(m); }
#else
#define RMSNORM_EXT_REGISTER_HOST_CUDA(fn)
#endif

#define RMSNORM_EXT_REGISTER_HOST(fn)                   \
  TORCH_LIBRARY_IMPL(rmsnorm_ext, CPU, m) { fn(m); }    \
  TORCH_LIBRARY_IMPL(rmsnorm_ext, Meta, m) { fn(m); }   \
  RMSNORM_EXT_REGISTER_HOST_CUDA(fn)
