"""models/ is pure PyTorch (DESIGN.md): no orchestration, tracking or data-pipeline imports anywhere in it,
the name-only modules import without torch, and DiT and MM-DiT share one output layer and one unpatchify."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import ROOT

MODEL_FILES = sorted((ROOT / "models").glob("*.py"))
FORBIDDEN = {"ray", "deepspeed", "mlflow", "webdataset", "harness", "analysis"}


def imported_modules(path: Path) -> set[str]:
    """Top-level package of every import statement in the file, wherever it stands (functions,
    TYPE_CHECKING blocks, try/except included). Relative imports (`from . import x`) stay in models/."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_model_files_are_found():
    assert len(MODEL_FILES) > 3 and {"dit.py", "mmdit.py", "layers.py"} <= {p.name for p in MODEL_FILES}


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.name)
def test_models_import_no_orchestration(path):
    assert not imported_modules(path) & FORBIDDEN, f"{path.name} imports {sorted(imported_modules(path) & FORBIDDEN)}"


def test_the_import_scan_sees_nested_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import ray.tune\n    from harness.x import y\n")
    assert {"ray", "harness"} <= imported_modules(probe)


def test_registry_and_flops_import_without_torch():
    code = "import sys, models.registry, models.flops; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_dit_and_mmdit_share_the_output_layer_and_unpatchify():
    import models.dit
    import models.layers
    import models.mmdit

    assert models.dit.FinalLayer is models.layers.FinalLayer is models.mmdit.FinalLayer
    assert models.dit.unpatchify is models.layers.unpatchify is models.mmdit.unpatchify
    assert models.dit.init_adaln_zero is models.layers.init_adaln_zero is models.mmdit.init_adaln_zero

    from models import build_model

    dit = build_model("DiT-XXS/2", input_size=8, in_channels=4, num_classes=3)
    mmdit = build_model("MMDiT-d2/2", input_size=8, in_channels=4, context_dim=8, pooled_dim=4)
    assert type(dit.final_layer) is type(mmdit.final_layer) is models.layers.FinalLayer
