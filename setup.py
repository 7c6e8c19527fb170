"""Installs the `research` package: five training methods for vision models in JAX/Flax."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.7,<0.11",
    "flax>=0.11,<0.13",
    "optax>=0.2.5,<0.3",
    # ott-jax 0.6 breaks on JAX >= 0.9 only through PointCloud(batch_size=...), which this
    # code never uses (see research/ot_perturbation); the pin keeps to the tested minor.
    "ott-jax>=0.5,<0.7",
    "chex>=0.1.90,<0.2",
    "absl-py>=2.1,<3",
    "ml-collections>=1.0,<2",
    "orbax-checkpoint>=0.11,<0.13",
    "tensorflow-datasets>=4.9.8,<4.10",
    "array-record>=0.7,<0.9",
    # streaming input pipelines (research.data.pipeline); needs no TensorFlow
    "grain>=0.2.18,<0.3",
    "etils[epath]>=1.7",
    # tfds's builders need it and, without TensorFlow, nothing else pulls it in.
    "importlib_resources>=6",
    "numpy>=1.26,<3",
    "scipy>=1.12,<2",
    "scikit-learn>=1.4,<2",  # ships the embedded handwritten digits
    "matplotlib>=3.8,<4",
    "tensorboardX>=2.6.2,<3",  # TensorBoard event files without TensorFlow (<workdir>/tb/)
]

EXTRAS_REQUIRE = {
    "test": [
        "pytest>=8,<10",
        "pytest-xdist>=3.5,<4",  # the suite runs on 2 workers (launch/run_tests.sh)
        "POT>=0.9.4,<0.10",  # independent optimal-transport reference
        "nbclient>=0.10,<0.12",
        "nbformat>=5.10,<6",
        "ipykernel>=6.29,<8",
        "tensorboard>=2.16,<3",  # its EventAccumulator reads our event files back (no TF)
        "fsspec>=2024.2",  # an in-memory bucket for the any-workdir tests
        "filelock>=3.12",  # JAX needs it to cap the tests' shared compilation cache
    ],
    "gcs": ["gcsfs>=2024.2"],  # gs:// workdirs through etils.epath without TensorFlow
    "notebooks": ["jupyter", "ipykernel>=6.29,<8"],
    "bench": ["POT>=0.9.4,<0.10"],  # torch==2.13.0 (CPU) is installed by the benchmark script
    "lint": ["ruff>=0.6"],
}

setup(
    name="research",
    version="0.1.0",
    description="JAX/Flax reference implementations of five training methods for vision models.",
    packages=find_packages(include=["research", "research.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
