// moeflux._C: importing it runs the static registrations of the ops
// (registration.cpp) linked into this module. It holds no Python functions:
// the ops are reached as torch.ops.moeflux.*.
#include <Python.h>

static PyModuleDef moeflux_module = {
    PyModuleDef_HEAD_INIT, "_C", "moeflux C++/CUDA ops, registered as torch.ops.moeflux", -1, nullptr,
};

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
