"""jaxlm: a JAX/Flax trainer for language-model pretraining."""

import re

from setuptools import find_packages, setup

version = re.search(r"__version__ = '([^']+)'", open('jaxlm/__init__.py').read()).group(1)

setup(
    name='jaxlm',
    version=version,
    description='JAX/Flax language-model pretraining from one CPU to a TPU pod',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['jaxlm', 'jaxlm.*']),
    python_requires='>=3.10',
    install_requires=[
        'jax>=0.7.1',
        'flax>=0.11.1',
        'optax>=0.2.5',
        'orbax-checkpoint>=0.11.20',
        'tensorflow-datasets>=4.9.9',
        'importlib_resources>=6',  # tensorflow-datasets needs it without TensorFlow.
        'sentencepiece>=0.2.0',
        'tokenizers>=0.20',  # Hugging Face tokenizer.json files (GPT-2, BERT, Llama 3).
        'ml-collections>=1.1.0',
        'grain>=0.2.12',
        'tensorboardX>=2.6.2',
        'tqdm>=4.66',
        'numpy>=1.26',
        'pyarrow>=14',  # Parquet corpora.
        'matplotlib>=3.7',  # jaxlm fit's plots.
        'safetensors>=0.4.3',  # jaxlm convert (its numpy API: no PyTorch).
        'qwix>=0.1.8',  # model.matmul='int8' (jaxlm/matmuls/int8.py), imported only then.
        'etils[epath]>=1.7', 'fsspec>=2024.2', 'gcsfs>=2024.2',  # gs:// paths (paths.py).
    ],
    extras_require={
        # convert --to-hf of a sentencepiece tokenizer: transformers' converter to tokenizer.json
        # (5.25 is the first that follows the model's own normalizer; hf_tokenizer.py).
        'hf': ['transformers>=5.25'],
        'wandb': ['wandb>=0.19'],  # metrics.wandb_project
        # jaxlm eval --tasks and the lm_eval.tasks hook (harness.py: its TemplateLM, generation
        # helpers). Task data comes through Hugging Face datasets.
        'eval': ['lm-eval>=0.4.13'],
        # libtpu (through jax's own extra, so its version matches jax's): `jaxlm plan
        # --topology` compiles for TPU slices on any Linux machine (~700 MB); on a TPU VM, what
        # runs on the chips.
        'tpu': ["jax[tpu]>=0.7.1; sys_platform == 'linux'"],
        # To look at a run: TensorBoard and its profile tab (xprof) for the traces.
        'tensorboard': ['tensorboard>=2.16', 'tensorboard-plugin-profile>=2.20'],
        # The Hugging Face parity tests compare against transformers on a (CPU) torch.
        # libtpu (through jax's own extra, so its version matches jax's) lets `jaxlm plan
        # --topology` compile for TPU slices on any Linux machine; ~700 MB.
        'test': ['pytest>=8', 'pytest-xdist>=3.5', 'hypothesis>=6.100',
                 'transformers>=5.25', 'torch>=2.2', "jax[tpu]>=0.7.1; sys_platform == 'linux'",
                 'gcp-storage-emulator>=2024.1',  # tests/test_gcs.py's local GCS.
                 'tensorboard>=2.16', 'tensorboard-plugin-profile>=2.20', 'wandb>=0.19',
                 'lm-eval>=0.4.13', 'accelerate>=1.0'],  # accelerate: lm-eval's hf backend.
    },
    entry_points={'console_scripts': ['jaxlm=jaxlm.cli:console_main']},
)
