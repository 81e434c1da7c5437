"""Generate the C source of the cffi extension `llaisys._core` from the public header.

The declarations between LLAISYS_CDEF_BEGIN and LLAISYS_CDEF_END are given to cffi as its cdef,
and the generated C includes the same header, so the compiler checks every declaration.
Usage: gen_cffi.py HEADER OUTPUT_C
"""
import pathlib
import sys

import cffi

# Python-side callback the binding installs as the abort callback (not part of the C API).
PYTHON_CALLBACKS = 'extern "Python" int32_t llaisys_py_abort(void *data);'


def main(header: str, output: str) -> None:
    text = pathlib.Path(header).read_text()
    try:
        cdef = text.split("/* LLAISYS_CDEF_BEGIN */", 1)[1].split("/* LLAISYS_CDEF_END */", 1)[0]
    except IndexError:
        sys.exit(f"{header}: missing LLAISYS_CDEF_BEGIN/END markers")
    ffi = cffi.FFI()
    ffi.cdef(cdef.replace("LLAISYS_API ", "") + "\n" + PYTHON_CALLBACKS)
    ffi.set_source("llaisys._core", '#include "llaisys.h"')
    ffi.emit_c_code(output)


if __name__ == "__main__":
    main(*sys.argv[1:])
