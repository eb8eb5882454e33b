// Python module shell for the extension. The ops register themselves with
// TORCH_LIBRARY_FRAGMENT in their own files; importing distprop_fast._C loads them.
#include <Python.h>

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
