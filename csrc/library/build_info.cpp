// `_C.build_info()`: what this binary was really built with (not what setup.py meant to
// build). rmsnorm_ext.build_info() turns these raw facts into readable ones.
//
// Lives apart from module.cpp (the op library and `_C`) so that build facts and the op library change
// independently; module.cpp's module definition takes its method table from here.
#include <Python.h>
#include <torch/version.h>

#include <string>

#include "../kernel_registry.h"

#ifdef RMSNORM_EXT_WITH_CUDA
namespace rmsnorm_ext {
std::string cuda_build_info();  // csrc/cuda/build_info.cu
}
#endif

#ifndef RMSNORM_EXT_CPU_ISA
#define RMSNORM_EXT_CPU_ISA "default"
#endif
// The CUDA arch list as setup.py handed it to nvcc (e.g. "8.0,9.0+PTX"): __CUDA_ARCH_LIST__
// (see build_info.cu) names only the real architectures, not whether PTX was embedded.
#ifndef RMSNORM_EXT_CUDA_ARCHS
#define RMSNORM_EXT_CUDA_ARCHS ""
#endif

namespace {

PyObject* build_info(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  if (!d) return nullptr;
  auto put = [&](const char* k, PyObject* v) {
    PyDict_SetItemString(d, k, v);
    Py_DECREF(v);
  };
  put("torch_version", PyUnicode_FromString(TORCH_VERSION));
#if defined(__clang__)
  put("compiler", PyUnicode_FromString("clang " __clang_version__));
#elif defined(__GNUC__)
  put("compiler", PyUnicode_FromString("gcc " __VERSION__));
#else
  put("compiler", PyUnicode_FromString("unknown"));
#endif
#ifdef _OPENMP
  put("openmp", PyLong_FromLong(_OPENMP));  // the spec's date code, e.g. 201511
#else
  put("openmp", Py_NewRef(Py_None));
#endif
  put("cpu_isa", PyUnicode_FromString(RMSNORM_EXT_CPU_ISA));
#ifdef RMSNORM_EXT_WITH_CUDA
  put("cuda", Py_NewRef(Py_True));
  put("cuda_info", PyUnicode_FromString(rmsnorm_ext::cuda_build_info().c_str()));
  put("cuda_arch_list", PyUnicode_FromString(RMSNORM_EXT_CUDA_ARCHS));
#else
  put("cuda", Py_NewRef(Py_False));
  put("cuda_info", PyUnicode_FromString(""));
  put("cuda_arch_list", PyUnicode_FromString(""));
#endif
#ifdef RMSNORM_EXT_CUDA_EMULATION
  // CPU tensors run the CUDA kernels on an emulator (csrc/cuda/emulation): a test build.
  put("cuda_emulation", Py_NewRef(Py_True));
#endif
  // "<kernel>:<device>" for every kernel slot a kernel file filled (kernel_registry.h).
  const auto& names = rmsnorm_ext::registered_kernels();
  PyObject* kernels = PyList_New(static_cast<Py_ssize_t>(names.size()));
  if (!kernels) {
    Py_DECREF(d);
    return nullptr;
  }
  for (size_t i = 0; i < names.size(); ++i) {
    PyList_SET_ITEM(kernels, static_cast<Py_ssize_t>(i), PyUnicode_FromString(names[i].c_str()));
  }
  put("kernels", kernels);
  return d;
}

}  // namespace

// The `_C` module's methods; module.cpp's PyInit__C uses this table.
PyMethodDef rmsnorm_ext_module_methods[] = {
    {"build_info", build_info, METH_NOARGS, "Facts about how this extension was compiled."},
    {nullptr, nullptr, 0, nullptr}};
