// The rmsnorm_ext op library and the Python module `_C` that loads it.
//
// The ops are defined in C++ (each with its host function, csrc/host/<op>.cpp), so they exist
// as soon as `_C` is imported; the Python package adds autograd, vmap, autocast and DTensor
// rules on top (rmsnorm_ext/_table.py).
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

// The module's methods (build_info), defined in csrc/library/build_info.cpp.
extern PyMethodDef rmsnorm_ext_module_methods[];

// The library: every op's schema is defined with its host function, in csrc/host/<op>.cpp
// (TORCH_LIBRARY_FRAGMENT), and registered there for each dispatch key (host/register.h).
TORCH_LIBRARY(rmsnorm_ext, m) {}

namespace {

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                          rmsnorm_ext_module_methods};

}  // namespace

namespace rmsnorm_ext {
int add_fast_functions(PyObject* module);  // csrc/python/python_fast.cpp
}

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (m && rmsnorm_ext::add_fast_functions(m) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
