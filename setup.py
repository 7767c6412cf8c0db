from setuptools import find_packages, setup

setup(
    name="pag-adm",
    version="0.1.0",
    description="Perturbed-Attention Guidance (PAG) on OpenAI's ADM (guided-diffusion) models",
    packages=find_packages(include=["adm_common", "guided_diffusion", "pag", "sampling", "evaluations", "analysis",
                                    "benchmarks"]),
    # The model configs of the official checkpoints, the reference batches' list and the experiment sweeps
    # (configs/ in the repository is a link to sampling/configs/).
    package_data={"sampling": ["configs/*.yaml", "configs/*/*.yaml"]},
    python_requires=">=3.9",
    install_requires=[
        # torch/torchvision are pinned: these releases are on the build machines' disk;
        # other releases download several GB.
        "torch==2.14.1",
        "torchvision==0.29.1",
        "numpy",
        "scipy",
        "torch-fidelity==0.3.0",
        "timm",  # DINOv2 ViT-L/14 for FD_DINOv2 (evaluations/dinov2.py)
        "blobfile",
        "mpi4py",
        "pyyaml",
        "tqdm",
        "pillow",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "openmpi"],
    },
)
