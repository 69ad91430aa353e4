// The eager fast path of the public functions (rmsnorm_ext/functional.py): a C function
// that calls the op through the C++ dispatcher. Calling an op through torch.ops costs
// ~4-5 us of Python argument handling, more than a [1, 4096] norm itself; here the whole
// call costs about as much as F.layer_norm's binding.
//
// Only the plain case is served: exact torch.Tensor/Parameter arguments, no torch-function
// mode or override, no torch.func transform, no forward-AD tangent on an argument, no CUDA
// autocast, well-formed normalized_shape and eps. Anything else returns NotImplemented and
// the Python caller takes the torch.ops path, whose Autograd kernel (rmsnorm_ext/
// _autograd.py) handles transforms, tangents and autocast; so every error message, subclass
// (DTensor) and mode behaves exactly as it does there. A call that needs a graph records
// the C++ node of csrc/autograd/autograd.cpp directly; otherwise the op runs below autograd.
// Dispatch modes and the profiler see the op as usual. Under torch.compile the Python
// caller never comes here (it traces torch.ops).
#include <Python.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <ATen/core/LegacyTypeDispatch.h>  // at::AutoDispatchBelowADInplaceOrView (not transitively included by torch 2.11)
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include "../autograd/autograd.h"
#include "../autograd/op_handles.h"
#include "../host/checks.h"

#include <optional>
#include <vector>

namespace rmsnorm_ext {
namespace {

// normalized_shape: an int or a list/tuple (torch.Size) of ints.
bool parse_shape(PyObject* o, std::vector<int64_t>& out) {
  if (PyLong_CheckExact(o)) {
    out.push_back(PyLong_AsLongLong(o));
    return !PyErr_Occurred();
  }
  if (!PyList_Check(o) && !PyTuple_Check(o)) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
  PyObject** items = PySequence_Fast_ITEMS(o);
  out.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!PyLong_CheckExact(items[i])) return false;
    out.push_back(PyLong_AsLongLong(items[i]));
    if (PyErr_Occurred()) return false;
  }
  return true;
}

bool plain_tensor(PyObject* o) { return THPVariable_CheckExact(o); }

bool plain_opt_tensor(PyObject* o) { return o == Py_None || THPVariable_CheckExact(o); }

std::optional<at::Tensor> opt_tensor(PyObject* o) {
  if (o == Py_None) return std::nullopt;
  return THPVariable_Unpack(o);
}

bool parse_double(PyObject* o, double& v) {
  if (PyFloat_CheckExact(o)) {
    v = PyFloat_AS_DOUBLE(o);
    return true;
  }
  if (PyLong_CheckExact(o)) {
    v = PyLong_AsDouble(o);
    return !PyErr_Occurred();
  }
  return false;
}

// eps: a Python float or int, or None for torch's default of a supported dtype: the epsilon of
// the type the norm computes in (float32's for float32 / bfloat16 / float16, float64's for
// float64), as functional._eps.
bool parse_eps(PyObject* o, at::ScalarType dtype, double& eps) {
  if (o != Py_None) return parse_double(o, eps);
  switch (dtype) {
    case at::kFloat:
    case at::kBFloat16:
    case at::kHalf: eps = 1.1920928955078125e-07; return true;
    case at::kDouble: eps = 2.220446049250313e-16; return true;
    default: return false;
  }
}

PyObject* not_implemented() {
  PyErr_Clear();
  Py_RETURN_NOTIMPLEMENTED;
}

// What the fast path cannot serve: a torch.func transform (functorch cannot see a C++
// autograd node), a forward-AD tangent on an argument (the node has no jvp), CUDA
// autocast (the ops' AutocastCUDA kernels sit in front of Autograd in the dispatcher).
bool declined(std::initializer_list<const at::Tensor*> ts) {
  if (at::impl::torch_function_mode_enabled() ||
      c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
      at::autocast::is_autocast_enabled(at::kCUDA)) {
    return true;
  }
  for (const at::Tensor* t : ts) {
    if (t->defined() && t->_fw_grad(/*level=*/0).defined()) return true;
  }
  return false;
}

// Whether the call records a graph: otherwise the op is called below the Autograd key,
// skipping the autograd kernel's bookkeeping (inference and decode loops).
bool needs_graph(std::initializer_list<const at::Tensor*> ts) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : ts) {
    if (t->defined() && t->requires_grad()) return true;
  }
  return false;
}

namespace oh = rmsnorm_ext::op_handles;
namespace ag = rmsnorm_ext::autograd_impl;

// graph: the C++ autograd node's call; plain: the op below autograd.
template <typename G, typename P>
auto call(bool graph, G&& with_graph, P&& plain) {
  pybind11::gil_scoped_release no_gil;
  if (graph) return with_graph();
  at::AutoDispatchBelowADInplaceOrView below;
  return plain();
}

// _rms_norm(input, normalized_shape, weight, eps, weight_offset) -> Tensor | NotImplemented
PyObject* fast_rms_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 5 || !plain_tensor(args[0]) || !plain_opt_tensor(args[2]) ||
      at::impl::torch_function_mode_enabled()) {
    return not_implemented();
  }
  const at::Tensor& x = THPVariable_Unpack(args[0]);
  std::vector<int64_t> ns;
  double eps = 0, offset = 0;
  if (!parse_shape(args[1], ns) || !parse_eps(args[3], x.scalar_type(), eps) ||
      !parse_double(args[4], offset)) {
    return not_implemented();
  }
  const auto w = opt_tensor(args[2]);
  const at::Tensor none;
  const at::Tensor* wp = w ? &*w : &none;
  if (declined({&x, wp})) return not_implemented();
  if (w && !same_or_fp32_beside_reduced(w->scalar_type(), x.scalar_type())) {
    return not_implemented();  // another weight dtype: functional._kernel_weight converts it
  }
  auto y = call(
      needs_graph({&x, wp}), [&] { return std::get<0>(ag::rms_norm_fwd_autograd(x, ns, w, eps, offset)); },
      [&] { return std::get<0>(oh::rms_norm_fwd().call(x, ns, w, eps, offset)); });
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

// _layer_norm(input, normalized_shape, weight, bias, eps) -> Tensor | NotImplemented
PyObject* fast_layer_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 5 || !plain_tensor(args[0]) || !plain_opt_tensor(args[2]) ||
      !plain_opt_tensor(args[3]) || at::impl::torch_function_mode_enabled()) {
    return not_implemented();
  }
  const at::Tensor& x = THPVariable_Unpack(args[0]);
  std::vector<int64_t> ns;
  double eps = 0;
  if (!parse_shape(args[1], ns) || !parse_double(args[4], eps)) return not_implemented();
  const auto w = opt_tensor(args[2]);
  const auto b = opt_tensor(args[3]);
  const at::Tensor none;
  const at::Tensor *wp = w ? &*w : &none, *bp = b ? &*b : &none;
  if (declined({&x, wp, bp})) return not_implemented();
  auto y = call(
      needs_graph({&x, wp, bp}), [&] { return std::get<0>(ag::layer_norm_fwd_autograd(x, ns, w, b, eps)); },
      [&] { return std::get<0>(oh::layer_norm_fwd().call(x, ns, w, b, eps)); });
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

// _fused_add_rms_norm(input, residual, normalized_shape, weight, eps, weight_offset)
//   -> (output, residual_out) | NotImplemented. eps=None is the residual's dtype's default.
PyObject* fast_fused_add_rms_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 6 || !plain_tensor(args[0]) || !plain_tensor(args[1]) ||
      !plain_opt_tensor(args[3]) || at::impl::torch_function_mode_enabled()) {
    return not_implemented();
  }
  const at::Tensor& x = THPVariable_Unpack(args[0]);
  const at::Tensor& r = THPVariable_Unpack(args[1]);
  std::vector<int64_t> ns;
  double eps = 0, offset = 0;
  if (!parse_shape(args[2], ns) || !parse_eps(args[4], r.scalar_type(), eps) ||
      !parse_double(args[5], offset)) {
    return not_implemented();
  }
  const auto w = opt_tensor(args[3]);
  const at::Tensor none;
  const at::Tensor* wp = w ? &*w : &none;
  if (declined({&x, &r, wp})) return not_implemented();
  auto out = call(
      needs_graph({&x, &r, wp}), [&] { return ag::fused_add_rms_norm_fwd_autograd(x, r, ns, w, eps, offset); },
      [&] { return oh::fused_add_rms_norm_fwd().call(x, r, ns, w, eps, offset); });
  PyObject* y = THPVariable_Wrap(std::move(std::get<0>(out)));
  if (!y) return nullptr;
  PyObject* h = THPVariable_Wrap(std::move(std::get<1>(out)));
  if (!h) {
    Py_DECREF(y);
    return nullptr;
  }
  PyObject* t = PyTuple_Pack(2, y, h);
  Py_DECREF(y);
  Py_DECREF(h);
  return t;
  END_HANDLE_TH_ERRORS
}

PyMethodDef fast_methods[] = {
    {"_rms_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(fast_rms_norm)),
     METH_FASTCALL, "Eager fast path of rmsnorm_ext.rms_norm (NotImplemented: use torch.ops)."},
    {"_layer_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(fast_layer_norm)),
     METH_FASTCALL, "Eager fast path of rmsnorm_ext.layer_norm (NotImplemented: use torch.ops)."},
    {"_fused_add_rms_norm",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(fast_fused_add_rms_norm)),
     METH_FASTCALL,
     "Eager fast path of rmsnorm_ext.fused_add_rms_norm (NotImplemented: use torch.ops)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

int add_fast_functions(PyObject* module) { return PyModule_AddFunctions(module, fast_methods); }

}  // namespace rmsnorm_ext
