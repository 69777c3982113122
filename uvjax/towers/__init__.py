"""The frozen image towers a unified model reads and writes through: the VQ tokenizer as a codec
(``vq_codec.VQCodec``: images <-> codes). They sit beside the models and data, below training and inference."""
