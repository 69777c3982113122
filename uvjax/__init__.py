"""uvjax: unified vision-language models (understand + generate images) in JAX/Flax."""

__version__ = "0.1.0"
