"""Load a script that lives outside any package (benchmarks/, data/) by its path. data/ has no
__init__.py on purpose: a package there would shadow the core's data.py."""
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script(relative: str):
    """The module of REPO/relative ("benchmarks/bench.py"), its own folder importable while it loads."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module
