// moeflux._C: importing it runs the static registrations of the ops
// (registration.cpp) linked into this module; the ops are reached as
// torch.ops.moeflux.*. The module itself only reports how the library was
// built and counts collectives.
#include <Python.h>

#include "csrc/distributed/all_to_all.h"

namespace {

PyObject* collective_counts(PyObject*, PyObject*) {
  const moeflux::CollectiveCounts counts = moeflux::collective_counts();
  return Py_BuildValue("{s:L,s:L}", "token_all_to_alls", static_cast<long long>(counts.token_all_to_alls),
                       "count_exchanges", static_cast<long long>(counts.count_exchanges));
}

PyObject* reset_collective_counts(PyObject*, PyObject*) {
  moeflux::reset_collective_counts();
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"collective_counts", collective_counts, METH_NOARGS,
     "Collectives issued by this process: {'token_all_to_alls': n, 'count_exchanges': m}."},
    {"reset_collective_counts", reset_collective_counts, METH_NOARGS, "Set the collective counts to zero."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef moeflux_module = {
    PyModuleDef_HEAD_INIT, "_C", "moeflux C++/CUDA ops, registered as torch.ops.moeflux", -1, methods,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&moeflux_module);
#ifdef MOEFLUX_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (module != nullptr && PyModule_AddIntConstant(module, "with_cuda", with_cuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
