"""PaCo-FR: patch-pixel aligned end-to-end codebook learning for facial representation pretraining."""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"  # the one version source: setup.py reads it from this line

_ROOT = Path(__file__).resolve().parent.parent
# Packages that live at the repository's top level (setup.py maps them).
_MAPPED = {"pacofr.kernels": _ROOT / "kernels", "pacofr.configs": _ROOT / "configs"}


class _SourceTreePackages(importlib.abc.MetaPathFinder):
    """`pacofr.kernels` and `pacofr.configs` are the repository's top-level kernels/ and
    configs/ (setup.py maps them). Installs carry that mapping; a source tree on sys.path
    (PYTHONPATH, running from the checkout, legacy `setup.py develop` installs) does not, so
    this last finder supplies it there."""

    def find_spec(self, name, path=None, target=None):
        folder = _MAPPED.get(name)
        if folder is None or not (folder / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


if not any(isinstance(f, _SourceTreePackages) for f in sys.meta_path):
    sys.meta_path.append(_SourceTreePackages())
