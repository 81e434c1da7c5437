"""Run pytest with `llaisys` imported from the given directory instead of the editable install.

    python scripts/pytest_with_package.py PACKAGE_DIR [pytest arguments]
"""
import sys

import pytest

package_dir, args = sys.argv[1], sys.argv[2:]
# The editable install answers `import llaisys` through a finder of its own: take it out.
sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__]
sys.path.insert(0, package_dir)
import llaisys  # noqa: E402

if not llaisys.__file__.startswith(package_dir):
    sys.exit(f"llaisys came from {llaisys.__file__}, not {package_dir}")
sys.exit(pytest.main(args))
