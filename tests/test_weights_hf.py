"""HF Llama safetensors ⇄ uvjax against transformers' own LlamaForCausalLM (tiny random models)."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import random_batch  # noqa: E402
from uvjax.config import base_config, model_config  # noqa: E402
from uvjax.data.arrays import TEXT  # noqa: E402
from uvjax.data.tokenizer import TextTokenizer, train_bpe  # noqa: E402
from uvjax.models.unified import UnifiedModel  # noqa: E402
from uvjax.training.step import dummy_batch  # noqa: E402
from uvjax.weights import export as ex  # noqa: E402
from uvjax.weights.hf_llama import load_hf_llama, model_dict_from_hf, read_hf_config  # noqa: E402
from uvjax.weights.pretrained import load_base_into_variables  # noqa: E402
from uvjax.config import pretrained_preset

VOCAB = 300  # >= the byte-level BPE's 256-symbol alphabet + specials, for the export test's tokenizer
ROPE = {
    "plain": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _save_tiny(path, *, tie, rope="plain", seed=0, shard="40KB"):
    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=tie,
              max_position_embeddings=128, rope_theta=500000.0 if rope == "llama3" else 5000.0)
    if ROPE[rope]:
        kw["rope_scaling"] = dict(ROPE[rope])
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    with torch.no_grad():  # HF inits norms to 1: randomise them so a swapped norm would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, max_shard_size=shard)
    return model


def _cfg(m, path=None, lora_rank=0, vocab=None):
    c = base_config()
    for k, v in m.items():
        c.model[k] = v
    if vocab:
        c.model.vocab_size = vocab
    c.model.lora.rank, c.model.lora.alpha = lora_rank, 8.0
    c.model.image.num_codes, c.model.image.code_dim = 24, 8
    if path:
        pretrained_preset(c, "hf", path, use_tokenizer=False)
    return c


def _init(c, seed=0):
    model = UnifiedModel(model_config(c).validate())
    v = nn.unbox(model.init({"params": jax.random.key(seed)}, dummy_batch(), method=UnifiedModel.init_all))
    return model, v


def _text_batch(ids):
    B, T = ids.shape
    return {"tokens": jnp.asarray(ids, jnp.int32), "modality": jnp.full((B, T), TEXT, jnp.int32),
            "segment_ids": jnp.ones((B, T), jnp.int32), "positions": jnp.tile(jnp.arange(T), (B, 1)),
            "text_target": jnp.zeros((B, T), jnp.int32), "image_target": jnp.zeros((B, T), jnp.int32)}


def _uv_logits(model, v, ids):
    h = model.apply(v, _text_batch(ids))
    return np.asarray(model.apply(v, h, method=UnifiedModel.text_logits))


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 24))


@pytest.mark.parametrize("tie,rope", [(False, "plain"), (True, "plain"), (False, "llama3"), (True, "linear")])
def test_import_matches_transformers(tmp_path, tie, rope):
    hf = _save_tiny(tmp_path, tie=tie, rope=rope)
    files = os.listdir(tmp_path)
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    m = model_dict_from_hf(read_hf_config(str(tmp_path)))
    assert m["tie_embeddings"] == tie and m["kv_heads"] == 2 and m["head_dim"] == 16
    c = _cfg(m, str(tmp_path))
    model, v = _init(c)
    v = load_base_into_variables(v, c)
    np.testing.assert_allclose(_uv_logits(model, v, IDS), _hf_logits(hf, IDS), atol=1e-4, rtol=0)


def test_bf16_import_and_new_vocab_rows(tmp_path):
    hf = _save_tiny(tmp_path, tie=False)
    params, m = load_hf_llama(str(tmp_path), "bfloat16")
    assert params["decoder"]["layers"]["attn"]["q"]["kernel"].dtype == jnp.bfloat16
    c = _cfg(m, str(tmp_path), vocab=VOCAB + 3)  # e.g. <boi>, <eoi>, one more marker
    model, v = _init(c)
    v = load_base_into_variables(v, c)
    got = _uv_logits(model, v, IDS)
    np.testing.assert_allclose(got[..., :VOCAB], _hf_logits(hf, IDS), atol=1e-4, rtol=0)
    emb = np.asarray(v["params"]["embed"]["embedding"])
    old = emb[:VOCAB]
    new = emb[VOCAB:]
    # mean of the existing rows + small noise: close to the mean, yet distinct rows
    assert np.abs(new - old.mean(0)).max() < 0.2 * old.std(0).max()
    assert np.abs(new[0] - new[1]).max() > 0
    head = np.asarray(v["params"]["lm_head"]["kernel"])
    assert head.shape == (64, VOCAB + 3)
    np.testing.assert_allclose(head[:, VOCAB:].mean(1), head[:, :VOCAB].mean(1), atol=0.05)


def test_lora_export_loads_in_transformers_and_round_trips(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _save_tiny(src, tie=False, rope="llama3")
    params, m = load_hf_llama(str(src))
    c = _cfg(m, str(src), lora_rank=4)
    model, v = _init(c)
    v = load_base_into_variables(v, c)
    keys = jax.random.split(jax.random.key(3), 64)
    leaves, tdef = jax.tree_util.tree_flatten(v["lora"])
    v["lora"] = jax.tree_util.tree_unflatten(tdef, [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    want = _uv_logits(model, v, IDS)
    tok = train_bpe(["a unified model reads and writes images", "what is the weather?"] * 20, vocab_size=280)
    summary = ex.export_hf(v, model.cfg, tok, str(out), template="chatml", max_shard_size="60KB", run_config=c)
    assert len(summary["weights"]) > 1
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    np.testing.assert_allclose(_hf_logits(hf, IDS), want, atol=1e-4, rtol=0)
    # tokenizer files: transformers and uvjax read the same vocabulary and specials
    htok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "what is the weather? a model"
    assert htok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert htok.eos_token == "</s>" and htok.convert_tokens_to_ids("<boi>") == tok.boi_id
    back = TextTokenizer.load(str(out))
    assert back.ids == tok.ids
    # image modules + decoder round trip into uvjax params
    v2, m2, image_cfg = ex.load_exported(str(out))
    assert m2 == {**m, "rope_scaling": tuple(m["rope_scaling"])}
    assert image_cfg["num_codes"] == 24
    merged = ex.merged_params(v, model.cfg.decoder.lora)
    flat_a = jax.tree_util.tree_leaves_with_path(merged)
    flat_b = dict(jax.tree_util.tree_leaves_with_path(v2["params"]))
    assert len(flat_a) == len(flat_b)
    for path, a in flat_a:
        np.testing.assert_allclose(np.asarray(flat_b[path]), np.asarray(a), atol=1e-6, err_msg=str(path))
    # the re-imported model (no LoRA) computes the same text and image logits
    c2 = _cfg(m2)
    model2 = UnifiedModel(model_config(c2).validate())
    batch = {k: jnp.asarray(x) for k, x in random_batch(np.random.default_rng(1), 2, 16, 24, VOCAB).items()}
    h1, h2 = model.apply(v, batch), model2.apply(v2, batch)
    for method in (UnifiedModel.image_logits, UnifiedModel.text_logits):
        np.testing.assert_allclose(np.asarray(model2.apply(v2, h2, method=method)),
                                   np.asarray(model.apply(v, h1, method=method)), atol=1e-4)


# ----------------------------------------------------------------------------------- clear errors
def _rewrite_config(path, **changes):
    p = os.path.join(path, "config.json")
    with open(p) as f:
        d = json.load(f)
    d.update(changes)
    with open(p, "w") as f:
        json.dump(d, f)


def test_errors_name_the_problem(tmp_path):
    from safetensors.numpy import load_file, save_file
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_llama(str(tmp_path / "nope"))
    src = tmp_path / "m"
    _save_tiny(src, tie=True, shard="10GB")
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        _rewrite_config(src, model_type="gpt2")
        load_hf_llama(str(src))
    _rewrite_config(src, model_type="llama", intermediate_size=100)
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight has shape .*96.*, expected .*100.* from the config"):
        load_hf_llama(str(src))
    _rewrite_config(src, intermediate_size=96)
    f = os.path.join(src, "model.safetensors")
    t = load_file(f)
    t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    del t["model.layers.2.mlp.up_proj.weight"]
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"not used .*q_proj.bias"):
        load_hf_llama(str(src))
    del t["model.layers.0.self_attn.q_proj.bias"]
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors \['up\[layer 2\]'\]"):
        load_hf_llama(str(src))
    os.remove(f)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_hf_llama(str(src))


def test_pretrained_path_absent_and_shape_mismatch(tmp_path):
    from uvjax.config import vicuna7b_preset
    c = base_config()
    vicuna7b_preset(c, str(tmp_path / "vicuna-7b-v1.5"))
    model_config(c).validate()
    assert c.model.vocab_size == 32004 and c.model.lora.rank == 128 and c.data.template == "vicuna_v1"
    with pytest.raises(FileNotFoundError, match="pretrained.path=.*vicuna-7b-v1.5.*does not exist"):
        load_base_into_variables({"params": {}}, c)
    src = tmp_path / "m"
    _save_tiny(src, tie=True, shard="10GB")
    m = model_dict_from_hf(read_hf_config(str(src)))
    c = _cfg({**m, "layers": 2, "norm_eps": 1e-5}, str(src))
    with pytest.raises(ValueError, match=r"model.layers: config 2 vs checkpoint 3[\s\S]*model.norm_eps"):
        load_base_into_variables({"params": {}}, c)


def test_load_into_sharded_train_state(tmp_path):
    """The trainer hook: base leaves replaced on their own shardings (8 fake devices, fsdp), the
    rest (adapters, LoRA) untouched."""
    from uvjax.config import lora_preset
    from uvjax.training.optimizer import merge_variables
    from uvjax.training.sharding import make_mesh
    from uvjax.training.step import create_trainer
    from uvjax.weights.pretrained import load_base_into_state
    hf = _save_tiny(tmp_path, tie=False)
    m = model_dict_from_hf(read_hf_config(str(tmp_path)))
    c = _cfg(m, str(tmp_path), vocab=VOCAB + 2)
    lora_preset(c, 4, 8.0)
    c.mesh.shape = (1, -1, 1)
    model = UnifiedModel(model_config(c).validate())
    mesh = make_mesh(c.mesh.shape)
    trainer, state = create_trainer(model, c, mesh, c.sharding.rules)
    before = merge_variables(state.trainable, state.frozen)
    state = load_base_into_state(state, trainer, c)
    emb = state.frozen["params"]["embed"]["embedding"]
    assert emb.sharding == trainer.state_shardings.frozen["params"]["embed"]["embedding"]
    v = merge_variables(state.trainable, state.frozen)
    np.testing.assert_allclose(_uv_logits(model, v, IDS)[..., :VOCAB], _hf_logits(hf, IDS), atol=1e-4, rtol=0)
    for top in ("image_codebook", "understanding_adapter", "generation_adapter", "generation_head"):
        for x, y in zip(jax.tree_util.tree_leaves(v["params"][top]), jax.tree_util.tree_leaves(before["params"][top])):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree_util.tree_leaves(v["lora"]), jax.tree_util.tree_leaves(before["lora"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_export_cli_on_a_trained_run(tmp_path):
    """``python -m uvjax.weights.export`` on a real run directory (2 LoRA steps of the smoke preset)."""
    import subprocess
    import sys

    from datasets import make_code_dataset
    from uvjax.config import load_config_file, lora_preset
    from uvjax.inference.loading import load_trained
    from uvjax.train import run
    ds = make_code_dataset(str(tmp_path / "data"), num_images=8)
    c = load_config_file("vqvq", "smoke")
    c.data.tokenizer = ds["tokenizer"]
    c.data.streams.understanding.paths = (ds["paths"]["understanding"],)
    c.data.streams.generation.paths = (ds["paths"]["generation"],)
    c.stages.build = False
    c.train.steps, c.train.checkpoint_every, c.train.progress, c.train.async_checkpoint = 2, 2, False, False
    c.mesh.shape = (1, -1, 1)  # the 8 fake test devices
    lora_preset(c, 4, 8.0)
    c.optim.lr_rules = ((c.optim.lr_rules[0][0], 1e-2),)
    c.optim.lr = 5e-2  # large enough that the 2 steps move LoRA B away from zero
    work, out = str(tmp_path / "run"), str(tmp_path / "export")
    run(c, work, progress=False)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XLA_FLAGS", None)
    p = subprocess.run([sys.executable, "-m", "uvjax.weights.export", f"--workdir={work}", f"--out={out}"],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout)["step"] == 2
    loaded = load_trained(work)
    b = loaded.variables["lora"]["decoder"]["layers"]["attn"]["q"]["b"]
    assert np.abs(np.asarray(b)).max() > 0  # the export had real LoRA deltas to merge
    ids = np.random.default_rng(2).integers(0, ds["vocab_size"], (1, 12))
    want = _uv_logits(loaded.model, loaded.variables, ids)
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(_hf_logits(hf, ids), want, atol=1e-4, rtol=0)
    with open(os.path.join(out, "uvjax_config.json")) as f:
        assert json.load(f)["model"]["lora"]["rank"] == 4
