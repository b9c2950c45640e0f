"""Tests for avex._compat.ensure_timm_importable (torchvision/timm import shim)."""

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from avex._compat import _has_schema, ensure_timm_importable

REPO = Path(__file__).resolve().parents[1]
# Load the shim alone: `import avex._compat` would run avex/__init__, which imports timm.
LOAD_SHIM = (
    "import importlib.util; "
    "spec = importlib.util.spec_from_file_location('shim', 'avex/_compat.py'); "
    "c = importlib.util.module_from_spec(spec); spec.loader.exec_module(c)"
)


def _run(code: str) -> str:
    """Run code in a fresh interpreter (import state is process-global)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip()


def test_timm_imports_and_tiny_vit_runs():
    ensure_timm_importable()
    import timm

    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10
    ).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert _has_schema("torchvision::nms")


def test_idempotent():
    first = ensure_timm_importable()
    assert ensure_timm_importable() is first
    assert ensure_timm_importable() is first
    importlib.import_module("torchvision")  # must stay importable

    assert _has_schema("torchvision::nms")
    if first:  # the shim defined both; a torchvision that loads natively need not have qnms (the GPU image's has not)
        assert _has_schema("torchvision::qnms")


def test_applied_iff_needed_in_fresh_process():
    # Ground truth, taken without the shim: does torchvision's native lib load here?
    native_ok = _run(
        """
        import importlib.util, importlib.machinery, torch
        d = importlib.util.find_spec("torchvision").submodule_search_locations[0]
        f = importlib.machinery.FileFinder(d, (importlib.machinery.ExtensionFileLoader,
                                               importlib.machinery.EXTENSION_SUFFIXES))
        try:
            torch.ops.load_library(f.find_spec("_C").origin); print("yes")
        except OSError:
            print("no")
        """
    )
    applied = _run("from avex._compat import ensure_timm_importable as e; print(e()); import timm")
    assert applied == str(native_ok == "no")


def test_importing_the_module_applies_the_shim():
    # avex/__init__.py imports avex._compat first and relies on this: no call needed before `import timm`.
    out = _run(
        f"""
        {LOAD_SHIM}
        import timm
        print(c._LIB is not None or c._has_schema("torchvision::nms"))
        """
    )
    assert out == "True"


def test_noop_when_schema_already_defined():
    # Simulates a torchvision whose native ops loaded normally.
    out = _run(
        f"""
        import torch
        lib = torch.library.Library("torchvision", "FRAGMENT")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        {LOAD_SHIM}
        print(c.ensure_timm_importable(), c._LIB is None, c._has_schema("torchvision::qnms"))
        """
    )
    assert out == "False True False"


def test_noop_when_torchvision_absent():
    out = _run(
        f"""
        import sys
        sys.modules["torchvision"] = None  # makes find_spec report it missing
        {LOAD_SHIM}
        print(c.ensure_timm_importable(), c._has_schema("torchvision::nms"))
        """
    )
    assert out == "False False"
