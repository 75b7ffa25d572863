"""PaCo-FR: patch-pixel aligned end-to-end codebook learning for facial representation pretraining."""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"

_KERNELS = Path(__file__).resolve().parent.parent / "kernels"


class _SourceTreeKernels(importlib.abc.MetaPathFinder):
    """`pacofr.kernels` is the repository's top-level kernels/ (setup.py maps it). Installs
    carry that mapping; a source tree on sys.path (PYTHONPATH, running from the checkout,
    legacy `setup.py develop` installs) does not, so this last finder supplies it there."""

    def find_spec(self, name, path=None, target=None):
        if name != "pacofr.kernels" or not (_KERNELS / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(name, _KERNELS / "__init__.py",
                                                      submodule_search_locations=[str(_KERNELS)])


if not any(isinstance(f, _SourceTreeKernels) for f in sys.meta_path):
    sys.meta_path.append(_SourceTreeKernels())
