"""CLIP-VQ on real data (seed §5.2): CLIP ViT-L/14-336 layer −2 features (576 x 1024) in through an
mlp2x_gelu understanding adapter; VQ-16 codes (256 per image) out through an mlp2x_gelu generation adapter
(8 -> 4096 -> 4096, as the reference) and a 16384-way head, CE with alpha 0.2. Vicuna-7B shapes.

Presets ``finetune`` (default) and ``pretrain`` and every path knob are those of ``configs/clipclip.py``,
plus ``towers.vq.path`` (LlamaGen ``vq_ds16_c2i``, converted by ``uvjax.weights.llamagen_vq``).
"""


def get_config(arg: str | None = None):
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location(
        "uvjax_configs_clipclip_shared", os.path.join(os.path.dirname(os.path.abspath(__file__)), "clipclip.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.real_data_config((arg or "finetune").strip(), "clipvq", "codes")


