"""Stand-in modules for the component subprocesses of ``kfp.local`` runs (the pipeline tests).

``install(stub_dir, monkeypatch, {"editinfinity.edit.stages": source, ...})`` writes each source as a file, a
``sitecustomize`` that maps those module names to them, and puts the folder first on ``PYTHONPATH``: only the
subprocesses that KFP starts import the stand-ins, the test process keeps the real modules.
"""

from __future__ import annotations

import os
from pathlib import Path

SITECUSTOMIZE = '''
import importlib.abc, importlib.util, os, sys
_DIR = os.path.dirname(os.path.abspath(__file__))
_STUBS = {stubs!r}
class _StubFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname in _STUBS:
            return importlib.util.spec_from_file_location(fullname, os.path.join(_DIR, _STUBS[fullname]))
        return None
sys.meta_path.insert(0, _StubFinder())
'''

#: ``editinfinity.models.bundle`` without models: ``load_models`` returns what it was asked for; ``ModelBundle``
#: exists because library modules import it at module level.
STUB_BUNDLE = '''
class ModelBundle:  # the name library modules import for their type hints
    pass


def load_models(preset=None, *, weights=None, device=None, bias_mode=None, dtype=None, text_encoder=True):
    return {"preset": preset, "weights": weights, "text_encoder": text_encoder}
'''


def install(stub_dir: Path, monkeypatch, modules: dict[str, str]) -> Path:
    """Write ``modules`` (module name -> source) as stand-ins for the subprocesses; returns ``stub_dir``."""
    stub_dir.mkdir(parents=True, exist_ok=True)
    files = {name: "stub_" + name.rsplit(".", 1)[-1] + ".py" for name in modules}
    for name, source in modules.items():
        (stub_dir / files[name]).write_text(source)
    (stub_dir / "sitecustomize.py").write_text(SITECUSTOMIZE.format(stubs=files))
    monkeypatch.setenv("PYTHONPATH",
                       os.pathsep.join([str(stub_dir), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return stub_dir
