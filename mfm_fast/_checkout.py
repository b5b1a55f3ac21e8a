"""``mfm_fast.kernels`` from a source checkout that was not installed.

The Triton kernels live in the repository's top-level folder ``kernels/`` and install as the subpackage
``mfm_fast.kernels`` (setup.py's package_dir), never as a bare top-level ``kernels``. An installed
package (editable or not) finds it on its own; a checkout on sys.path without an install does not, so
this registers the folder under that name. Importing it costs nothing: kernels/__init__.py imports no
kernel module (they import triton, on first use).
"""

import importlib.util
import os
import sys


def provide_kernels_package() -> None:
    if importlib.util.find_spec("mfm_fast.kernels") is not None:
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(folder, "__init__.py")
    if not os.path.isfile(init):
        return  # an install without the kernels: the triton backend then reports itself unavailable
    spec = importlib.util.spec_from_file_location("mfm_fast.kernels", init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules["mfm_fast.kernels"] = module
    spec.loader.exec_module(module)
