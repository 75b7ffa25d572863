import os
import re
from pathlib import Path

from setuptools import find_packages, setup

# The one version source is pacofr/__init__.py, read as text (importing pacofr here would need
# its dependencies, torch among them, before they are installed).
VERSION = re.search(r'^__version__ = "([^"]+)"', Path(__file__).with_name("pacofr").joinpath("__init__.py")
                    .read_text(), re.M).group(1)



def native_backend() -> dict:
    """The optional C++ backend, csrc/*.cpp built into pacofr._C with ninja. It needs torch at
    build time (pip install --no-build-isolation after torch); without torch, or with
    PACOFR_NATIVE=0, the package installs without it and the ops run their other backends
    (`pacofr.ops.explain` says why)."""
    if os.environ.get("PACOFR_NATIVE", "1") == "0":
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return {}
    sources = sorted(str(p) for p in Path("csrc").glob("*.cpp"))
    # -O3 for the vectorized loops; the machine's own instruction set only when asked
    # (PACOFR_NATIVE_ARCH=native), so a built wheel still runs on other x86-64 machines.
    flags = ["-O3", "-fopenmp"] + ([f"-march={os.environ['PACOFR_NATIVE_ARCH']}"] if os.environ.get("PACOFR_NATIVE_ARCH") else [])
    return {"ext_modules": [CppExtension("pacofr._C", sources, extra_compile_args=flags, extra_link_args=["-fopenmp"])],
            "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(
    name="pacofr",
    version=VERSION,
    description="PaCo-FR: patch-pixel aligned end-to-end codebook learning for facial representation pretraining",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    url="https://github.com/pacofr/pacofr",
    project_urls={
        "Paper": "https://arxiv.org/abs/2508.09691",
        "Source": "https://github.com/pacofr/pacofr",
    },
    python_requires=">=3.10",
    # kernels/ and configs/ live at the top level; installed, they are pacofr.kernels and
    # pacofr.configs (a source tree gets the same names from pacofr/__init__.py).
    packages=find_packages(include=["pacofr", "pacofr.*"]) + ["pacofr.kernels", "pacofr.configs"],
    package_dir={"pacofr.kernels": "kernels", "pacofr.configs": "configs"},
    package_data={"pacofr.configs": ["*.yaml", "*.json"], "pacofr.ops": ["dispatch_table.json"]},
    # torch is installed first by the Makefile (a CPU build here, a CUDA build on GPU machines);
    # the range only guards against a torch too old for torch.library.custom_op.
    install_requires=[
        "torch>=2.4,<=2.14.1", "numpy", "pyyaml", "safetensors", "pillow", "webdataset", "tqdm", "tensorboard",
        "scikit-image",  # the embedded faces of the default dataset and of `make demo`
        "scipy",  # the benchmarks' .mat annotations (COFW, AFLW-19, 300W-LP, AFLW2000-3D)
    ],
    extras_require={
        "triton": ["triton"],  # GPU machines ship it with torch; on CPU it runs the interpreter
        "deepspeed": ["deepspeed>=0.19.8,<0.20"],  # ZeRO (train.deepspeed); the range that is tested
        "dali": ["nvidia-dali-cuda130"],  # data.decoder='dali' (the build for CUDA 13; others exist)
        # Loading an exported encoder into timm. On CPU-only machines the Makefile installs timm
        # with --no-deps instead: see the comment there.
        "timm": ["timm>=1.0"],
        # What the default test run needs; `make test` adds dali and deepspeed so their tests run
        # too (they skip, saying why, without them). setuptools: tests/test_packaging.py builds a wheel.
        "test": ["pytest", "pytest-benchmark", "setuptools>=77"],
        # `make bench`: faiss's exact search, the CPU baseline of the native codebook_topk
        "bench": ["faiss-cpu", "pytest-benchmark"],
        # `make eval-demo`'s pseudo-labels: dlib's 68-point shape predictor (CC0 models).
        "demo-labels": ["face-recognition-models==0.3.0", "dlib-bin"],
    },
    entry_points={"console_scripts": ["pacofr = pacofr.cli:main"]},
    **native_backend(),
)
