"""The repository layout must not break Python started from the repository root."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_operator_folder_is_a_namespace_portion():
    # An __init__.py there would make `import operator` from the repo root pick our folder.
    assert not os.path.exists(os.path.join(ROOT, "operator", "__init__.py"))


def test_stdlib_imports_work_from_repo_root():
    code = "import collections, operator, torch; import sys; print(operator.__file__ or 'builtin')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert os.path.join(ROOT, "operator") not in out.stdout


def test_package_imports_map_onto_folders():
    import pagedserve.kernels
    import pagedserve.runtime

    assert os.path.dirname(pagedserve.runtime.__file__) == os.path.join(ROOT, "runtime")
    assert os.path.dirname(pagedserve.kernels.__file__) == os.path.join(ROOT, "kernels")
