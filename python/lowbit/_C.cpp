// lowbit._C: an empty Python module that marks where the native files were installed; lowbit/__init__.py
// then loads liblowbit.so from beside it, whose static initialisers register torch.ops.lowbit.
#include <Python.h>

static struct PyModuleDef lowbit_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                             "lowbit native library loader (ops live in torch.ops.lowbit)", -1,
                                             nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&lowbit_c_module); }
