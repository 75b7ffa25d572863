// The Python module pacofr._C. The ops register themselves with the dispatcher when the library
// is loaded (each csrc/*.cpp adds its own to the `pacofr_native` namespace with
// TORCH_LIBRARY_FRAGMENT) and are called as torch.ops.pacofr_native.<op>; the module itself is
// empty, so that `import pacofr._C` loads them.
#include <Python.h>

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
