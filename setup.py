from setuptools import find_packages, setup

setup(
    name="pacofr",
    version="0.1.0",
    description="PaCo-FR: patch-pixel aligned end-to-end codebook learning for facial representation pretraining",
    python_requires=">=3.10",
    packages=find_packages(include=["pacofr", "pacofr.*"]) + ["pacofr.kernels"],
    package_dir={"pacofr.kernels": "kernels"},  # the Triton kernels live at the top level
    # torch is installed first by the Makefile (a CPU build here, a CUDA build on GPU machines);
    # the range only guards against a torch too old for torch.library.custom_op.
    install_requires=[
        "torch>=2.4,<=2.14.1", "numpy", "pyyaml", "safetensors", "pillow", "webdataset", "tqdm", "tensorboard",
        "scikit-image",  # the embedded faces of the default dataset and of `make demo`
    ],
    extras_require={
        "triton": ["triton"],  # GPU machines ship it with torch; on CPU it runs the interpreter
        # timm is installed with --no-deps by the Makefile: see the comment there.
        "deepspeed": ["deepspeed"],  # ZeRO (train.deepspeed)
        "dali": ["nvidia-dali-cuda130"],  # data.decoder='dali' (the build for CUDA 13; others exist)
        "test": ["pytest", "pytest-benchmark", "huggingface_hub", "deepspeed", "nvidia-dali-cuda130"],
    },
    entry_points={"console_scripts": ["pacofr = pacofr.cli:main"]},
)
