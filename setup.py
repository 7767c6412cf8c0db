from setuptools import find_packages, setup

setup(
    name="pag-adm",
    version="0.1.0",
    description="Perturbed-Attention Guidance (PAG) on OpenAI's ADM (guided-diffusion) models",
    packages=find_packages(include=["guided_diffusion", "guided_diffusion.*", "pag", "pag.*",
                                    "evaluations", "evaluations.*"]),
    python_requires=">=3.9",
    install_requires=[
        # torch/torchvision are pinned: these releases are on the build machines' disk;
        # other releases download several GB.
        "torch==2.14.1",
        "torchvision==0.29.1",
        "numpy",
        "scipy",
        "torch-fidelity==0.3.0",
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
