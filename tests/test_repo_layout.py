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


def test_kernels_folder_hands_the_top_level_name_to_an_installed_distribution():
    # From the repo root our kernels/ folder is also importable as a top-level `kernels`, the import name of
    # Hugging Face's `kernels` distribution, which transformers >= 5.25 depends on and imports. With that
    # distribution installed, `import kernels` must give it (and transformers' hub-kernel integration must
    # import); without it, our folder answers as before.
    import importlib.metadata

    try:
        installed = importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    code = ("import os, kernels, pagedserve.kernels as ours\n"
            "print(os.path.realpath(os.path.dirname(kernels.__file__)))\n"
            "print(os.path.realpath(os.path.dirname(ours.__file__)))\n")
    if installed:
        code += "import transformers.integrations.hub_kernels\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    top, ours = out.stdout.split()[:2]
    assert ours == os.path.realpath(os.path.join(ROOT, "kernels"))
    if installed:
        assert top != ours, f"`import kernels` from the repo root found our folder, not kernels {installed}"
    else:
        assert top == ours
