"""Config validation names the offending key; presets build valid models."""
import pytest

from uvjax.config import validate


def _cfg(preset="smoke"):
    from configs.vqvq import get_config
    return get_config(preset)


@pytest.mark.parametrize("key,value,match", [
    ("model.kv_heads", 3, "model.kv_heads"),
    ("model.image.und_adapter", "conv", "model.image.und_adapter"),
    ("loss.image_loss", "cosine", "loss.image_loss"),
    ("loss.text_target_capacity", 1.5, "loss.text_target_capacity"),
    ("train.nonfinite", "ignore", "train.nonfinite"),
    ("train.steps", 0, "train.steps"),
    ("model.lora.targets", ("q", "qkv"), "model.lora.targets"),
    ("model.remat", "some", "model.remat"),
    ("model.attention", "flash", "model.attention"),
    ("model.scan_unroll", -1, "model.scan_unroll"),
    ("model.attention", "cudnn", "model.attention"),  # the smoke preset computes in fp32: cuDNN has no kernel
])
def test_bad_values_name_the_key(key, value, match):
    c = _cfg()
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        validate(c)


def test_lora_trainable_without_rank_is_rejected():
    c = _cfg()
    c.train.trainable = ("lora/.*",)
    with pytest.raises(ValueError, match="model.lora.rank"):
        validate(c)


def test_unknown_key_is_rejected_by_the_locked_config():
    c = _cfg()
    c.lock()
    with pytest.raises(AttributeError, match="stepz"):
        c.train.stepz = 3


@pytest.mark.parametrize("preset", ["tiny", "tiny_paper", "tiny_long", "smoke"])
def test_presets_validate(preset):
    validate(_cfg(preset))


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        _cfg("huge")


def test_tiny_long_reuses_the_paper_recipes_stages_and_model():
    """``tiny_long`` differs from ``tiny_paper`` only in the LM (one more layer, mix, alpha, steps), so it reuses
    every cached stage of the paper-recipe first run."""
    tiny, long = _cfg("tiny_paper"), _cfg("tiny_long")
    assert long.stages.to_dict() == tiny.stages.to_dict()
    assert {**long.model.to_dict(), "layers": 0} == {**tiny.model.to_dict(), "layers": 0}
    assert (tiny.model.layers, long.model.layers) == (3, 4)
    assert (long.data.template, long.data.system_prompt) == (tiny.data.template, tiny.data.system_prompt)
    w = lambda c: (c.data.streams.understanding.weight, c.data.streams.generation.weight)
    assert w(tiny) == (2.0, 1.0) and w(long) == (1.0, 1.0)
    assert (tiny.loss.w_image, long.loss.w_image) == (0.2, 1.0)
    assert long.train.steps > tiny.train.steps


def test_the_first_run_differs_from_the_paper_recipe_only_in_issue_30s_levers():
    """``tiny`` (README line 1) = ``tiny_paper`` + image loss at full weight, an even mix, a generation answer
    that writes the layout before the image, a learned image cell embedding, 136-token rows, learning curves;
    same decoder, VQ, prompts and test split. The other architectures' ``tiny`` keep the paper's recipe."""
    tiny, paper = _cfg("tiny"), _cfg("tiny_paper")
    from flax.traverse_util import flatten_dict
    fa, fb = (flatten_dict(c.to_dict(), sep=".") for c in (tiny, paper))
    diff = {k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k)}
    assert diff == {"name", "loss.w_image", "data.streams.understanding.weight",
                    "stages.data.generation_plan", "model.image.image_positions", "train.seq_len", "train.eval_every"}
    assert (paper.loss.w_image, paper.data.streams.understanding.weight, paper.data.streams.generation.weight,
            paper.stages.data.generation_plan, paper.train.seq_len, paper.train.eval_every) == (0.2, 2.0, 1.0, False, 128, 0)
    assert (tiny.loss.w_image, tiny.data.streams.understanding.weight, tiny.data.streams.generation.weight,
            tiny.stages.data.generation_plan, tiny.stages.data.generation_mention_all, tiny.train.seq_len,
            tiny.model.image.image_positions, paper.model.image.image_positions) == (1.0, 1.0, 1.0, True, 0.0, 136, 64, 0)
    from uvjax.config import load_config_file
    for arch in ("siglipvq", "siglipsiglip", "vqsiglip"):
        c = load_config_file(arch, "tiny")
        assert (c.data.streams.understanding.weight, c.stages.data.generation_plan, c.train.seq_len) == (2.0, False, 128)


def test_attention_kernel_and_layer_unrolling_are_not_part_of_the_lm_fingerprint():
    """xla and cudnn compute the same function: switching keeps the run (and its checkpoints) resumable,
    while a change of what is computed (the compute dtype) does not."""
    from uvjax.training.workdir import lm_fingerprint
    a, b, c = _cfg(), _cfg(), _cfg()
    b.model.attention = "cudnn"
    b.model.scan_unroll = 0
    b.loss.fused_head_chunk = 64
    c.model.dtype = "bfloat16"
    assert lm_fingerprint(a) == lm_fingerprint(b)
    assert lm_fingerprint(a) != lm_fingerprint(c)


def test_resume_check_lets_keys_added_since_the_run_started_through_and_names_changed_ones(tmp_path):
    """A run started by older code (its config.json lacks a key the current code added, its fingerprint
    differs) resumes; a changed value or a removed key refuses, naming the key (hand-built configs)."""
    import json
    from uvjax.training.workdir import check_workdir_matches, lm_fingerprint
    cfg = _cfg()
    current = json.loads(cfg.to_json_best_effort())

    def workdir(name, run_cfg):
        d = tmp_path / name
        (d / "checkpoints" / "5").mkdir(parents=True)
        (d / "lm_fingerprint.json").write_text(json.dumps({"fingerprint": "an-older-fingerprint"}))
        (d / "config.json").write_text(json.dumps(run_cfg))
        return str(d)

    older = json.loads(json.dumps(current))
    del older["loss"]["z_loss"]  # the run started before this key existed
    d = workdir("added", older)
    assert check_workdir_matches(cfg, d) == lm_fingerprint(cfg)
    assert json.loads((tmp_path / "added" / "lm_fingerprint.json").read_text())["fingerprint"] == lm_fingerprint(cfg)

    changed = json.loads(json.dumps(current))
    changed["optim"]["lr"] = 2 * current["optim"]["lr"]
    with pytest.raises(ValueError, match=r"optim\.lr differ"):
        check_workdir_matches(cfg, workdir("changed", changed))

    removed = json.loads(json.dumps(current))
    removed["loss"]["a_key_the_current_code_dropped"] = 1
    with pytest.raises(ValueError, match="a_key_the_current_code_dropped"):
        check_workdir_matches(cfg, workdir("removed", removed))

    # a how-it-is-computed knob is no difference at all
    knob = json.loads(json.dumps(current))
    knob["loss"]["fused_head_chunk"] = 64
    check_workdir_matches(cfg, workdir("knob", knob))


def test_resume_check_with_damaged_fingerprint_or_config_files(tmp_path):
    """Fault drill (docs/RELIABILITY.md): a damaged lm_fingerprint.json falls back to the key-by-key check
    against config.json (the same config resumes); when config.json is damaged too, the resume is refused
    with a message naming the file; a deleted fingerprint file is rewritten."""
    import json
    from uvjax.training.workdir import check_workdir_matches, lm_fingerprint
    cfg = _cfg()
    current = cfg.to_json_best_effort()
    fp = lm_fingerprint(cfg)

    def workdir(name, fingerprint_text, config_text):
        d = tmp_path / name
        (d / "checkpoints" / "5").mkdir(parents=True)
        if fingerprint_text is not None:
            (d / "lm_fingerprint.json").write_text(fingerprint_text)
        (d / "config.json").write_text(config_text)
        return str(d)

    good = json.dumps({"fingerprint": fp})
    truncated, flipped = good[: len(good) // 2], good.replace(fp[3], "g" if fp[3] != "g" else "h", 1)
    for name, text in (("truncated", truncated), ("flipped", flipped), ("deleted", None)):
        d = workdir(name, text, current)
        assert check_workdir_matches(cfg, d) == fp, name
        assert json.loads((tmp_path / name / "lm_fingerprint.json").read_text())["fingerprint"] == fp
    with pytest.raises(ValueError, match=r"config\.json is damaged"):
        check_workdir_matches(cfg, workdir("both", truncated, current[: len(current) // 2]))


def test_cudnn_attention_config_runs_on_cpu_as_xla():
    """A bf16 config trained on a GPU with attention='cudnn' must still evaluate on a CPU (the XLA path)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn
    from uvjax.config import model_config
    from uvjax.models.unified import UnifiedModel
    from uvjax.training.step import dummy_batch
    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU the cuDNN path runs: tests/test_gpu.py compares the two")
    a, b = _cfg(), _cfg()
    for c in (a, b):
        c.model.dtype = "bfloat16"
    b.model.attention = "cudnn"
    ma, mb = UnifiedModel(model_config(a).validate()), UnifiedModel(model_config(b).validate())
    v = nn.unbox(ma.init({"params": jax.random.key(0)}, dummy_batch(0), method=UnifiedModel.init_all))
    batch = {k: jnp.asarray(x) for k, x in dummy_batch(0).items()}
    assert np.array_equal(np.asarray(ma.apply(v, batch), np.float32), np.asarray(mb.apply(v, batch), np.float32))
