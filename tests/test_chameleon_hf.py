"""HF Chameleon/Anole checkpoints ⇄ uvjax's shared-vocab model, against transformers' own
ChameleonForConditionalGeneration (tiny random models, fp32).

The image tokens of the test vocabulary sit at permuted, non-contiguous ids (an ``id = code + 4``
assumption fails), and every norm weight, q/k norm scale *and bias* and VQ GroupNorm is random (HF's 1/0
init would hide a swapped or dropped tensor)."""
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from uvjax.config import base_config, model_config  # noqa: E402
from uvjax.data.arrays import IMAGE_IN, IMAGE_OUT, TEXT  # noqa: E402
from uvjax.data.tokenizer import image_code_ids, image_token_name  # noqa: E402
from uvjax.models.unified import UnifiedModel  # noqa: E402
from uvjax.models.vq import VQModel, init_params  # noqa: E402
from uvjax.training.step import dummy_batch  # noqa: E402
from uvjax.weights import chameleon_export as ce  # noqa: E402
from uvjax.weights import hf_chameleon as hc  # noqa: E402
from uvjax.weights.llamagen_vq import chameleon_key_to_flax, flatten_params, load_vq  # noqa: E402
from uvjax.weights.pretrained import base_tokenizer, chameleon_preset, load_base_into_variables  # noqa: E402

V, N_CODES = 256, 48
SPECIAL = ["<s>", "<pad>", "</s>", "<unk>", "<racm3:break>", "<eoss>", "<reserved08706>", "<reserved08708>",
           "<image>"]
_rng = np.random.default_rng(7)
_free = _rng.permutation(np.arange(len(SPECIAL), V))
CODE_IDS = tuple(int(i) for i in _free[:N_CODES])  # code c -> vocabulary id, scattered in no order
WORD_IDS = sorted(int(i) for i in _free[N_CODES:])
VQ = dict(resolution=32, base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1, embed_dim=8,
          num_embeddings=N_CODES, latent_channels=32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _vocab() -> dict:
    vocab = {s: i for i, s in enumerate(SPECIAL)}
    vocab.update({image_token_name(c): i for c, i in enumerate(CODE_IDS)})
    vocab.update({f"w{k}": i for k, i in enumerate(WORD_IDS)})
    assert sorted(vocab.values()) == list(range(V))
    return vocab


def _write_tokenizer(path, vocab):
    """A WordLevel tokenizer.json written with the tokenizers library (not uvjax's classes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL)
    tok.save(os.path.join(path, "tokenizer.json"))


def _save_tiny(path, swin: bool, seed: int = 0):
    torch.manual_seed(seed)
    vocab = _vocab()
    cfg = transformers.ChameleonConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, swin_norm=swin, max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, vocabulary_map=vocab, vq_config=dict(VQ),
        bos_token_id=0, pad_token_id=1, eos_token_id=2)
    model = transformers.ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n and n.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif "norm" in n and n.endswith("bias"):
                p.normal_(0.0, 0.3)
        # codebook rows near real latents, so random images use many codes
        vqm = model.model.vqmodel
        z = vqm.quant_conv(vqm.encoder(torch.rand(4, 3, 32, 32) * 2 - 1)).permute(0, 2, 3, 1).reshape(-1, 8)
        pick = z[torch.randperm(z.shape[0])[:N_CODES]]
        vqm.quantize.embedding.weight.copy_(pick + 0.05 * z.std() * torch.randn_like(pick))
    model.save_pretrained(path, max_shard_size="100KB")
    _write_tokenizer(path, vocab)
    return model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """swin -> (checkpoint dir, the HF model saved there), each built once."""
    cache = {}

    def get(swin: bool):
        if swin not in cache:
            path = tmp_path_factory.mktemp("swin" if swin else "pre")
            cache[swin] = str(path), _save_tiny(path, swin)
        return cache[swin]
    return get


# ------------------------------------------------------------------------------------- sequences
def _mixed(seed=0, B=2):
    """(uvjax batch with codes at image positions, HF input ids): text, an image read, text, an image written."""
    r = np.random.default_rng(seed)
    toks, mods = [], []
    for _ in range(B):
        w = lambda n: list(r.choice(WORD_IDS, n))
        c = lambda n: list(r.integers(0, N_CODES, n))
        parts = [([0] + w(3) + [4], TEXT), (c(6), IMAGE_IN), ([5] + w(4) + [4], TEXT), (c(5), IMAGE_OUT),
                 ([5] + w(2), TEXT)]  # 0 <s>, 4 <racm3:break> (boi), 5 <eoss> (eoi)
        toks.append([t for p, _ in parts for t in p])
        mods.append([m for p, m in parts for _ in p])
    tokens, modality = np.asarray(toks, np.int32), np.asarray(mods, np.int32)
    ids = np.where(modality >= IMAGE_IN, np.asarray(CODE_IDS)[np.clip(tokens, 0, N_CODES - 1)], tokens)
    B, T = tokens.shape
    batch = {"tokens": jnp.asarray(tokens), "modality": jnp.asarray(modality),
             "segment_ids": jnp.ones((B, T), jnp.int32), "positions": jnp.tile(jnp.arange(T), (B, 1)),
             "text_target": jnp.zeros((B, T), jnp.int32), "image_target": jnp.zeros((B, T), jnp.int32)}
    return batch, ids


def _hf_full_logits(hf, ids):
    """h @ lm_head.T over the whole vocabulary (HF's forward sets the image columns to finfo.min)."""
    with torch.no_grad():
        x = torch.tensor(ids, dtype=torch.long)
        h = hf.model(input_ids=x).last_hidden_state
        return (h @ hf.lm_head.weight.T).numpy(), hf(input_ids=x).logits.numpy()


def _uvjax(path, lora_rank=4):
    c = base_config()
    chameleon_preset(c, path, rank=lora_rank, alpha=8.0)
    c.model.dtype = "float32"
    model = UnifiedModel(model_config(c).validate())
    # shapes only (an eager init of the scanned model costs seconds): every param is then imported, LoRA is 0
    shapes = nn.unbox(jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, dummy_batch(),
                                                        method=UnifiedModel.init_all)))
    v = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    v = load_base_into_variables(v, c)
    assert all(np.abs(np.asarray(x)).max() > 0 for x in jax.tree_util.tree_leaves(v["params"]))
    return c, model, v


def _logits(model, v, batch):
    h = model.apply(v, batch)
    return (np.asarray(model.apply(v, h, method=UnifiedModel.text_logits)),
            np.asarray(model.apply(v, h, method=UnifiedModel.image_logits)))


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("swin", [False, True], ids=["pre", "swin"])
def test_import_matches_transformers_and_export_round_trips(ckpts, swin, tmp_path):
    path, hf = ckpts(swin)
    assert any(f.endswith(".safetensors.index.json") for f in os.listdir(path))  # sharded checkpoint
    hfc = hc.read_chameleon_config(path)
    over = hc.model_overrides_from_hf(hfc)
    assert over["image"]["code_token_ids"] == CODE_IDS != tuple(range(4, 4 + N_CODES))
    assert over["norm_placement"] == ("swin" if hfc["swin_norm"] else "pre") and over["qk_norm"]
    c, model, v = _uvjax(path)
    assert tuple(c.model.image.code_token_ids) == CODE_IDS and c.model.image.layout == "shared_vocab"
    batch, ids = _mixed()
    full, hf_logits = _hf_full_logits(hf, ids)
    img = np.zeros(V, bool)
    img[list(CODE_IDS)] = True
    np.testing.assert_allclose(hf_logits[..., ~img], full[..., ~img], atol=1e-5)  # HF's own masking, understood
    assert (hf_logits[..., img] == np.finfo(np.float32).min).all()
    text, image = _logits(model, v, batch)
    np.testing.assert_allclose(text, full, atol=1e-4, rtol=0)
    np.testing.assert_allclose(image, full[..., list(CODE_IDS)], atol=1e-4, rtol=0)  # code order

    # tokenizer: Chameleon's specials by name, ChatML on reserved rows, no vocabulary growth
    tok = base_tokenizer(c)
    vocab = _vocab()
    assert tok.vocab_size == V and image_code_ids(tok, N_CODES) == CODE_IDS
    assert {n: tok.ids[n] for n in ("bos", "eos", "pad", "boi", "eoi", "im_start", "im_end")} == {
        "bos": vocab["<s>"], "eos": vocab["</s>"], "pad": vocab["<pad>"], "boi": vocab["<racm3:break>"],
        "eoi": vocab["<eoss>"], "im_start": vocab["<reserved08708>"], "im_end": vocab["<reserved08706>"]}

    # export with random LoRA factors merged, and the run's VQ (converted from the same checkpoint)
    cfg_vq, vq_params, has_dec = hc.load_chameleon_vq(path)
    assert not has_dec
    leaves, tdef = jax.tree_util.tree_flatten(v["lora"])
    keys = jax.random.split(jax.random.key(3), len(leaves))
    v["lora"] = jax.tree_util.tree_unflatten(tdef, [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    want_text, want_image = _logits(model, v, batch)
    assert np.abs(want_text - text).max() > 1e-3  # the LoRA deltas matter
    out = str(tmp_path / "export")
    s = ce.export_chameleon(v, model.cfg, tok, out, vq=(cfg_vq, vq_params), image_size=32, template="chatml",
                            max_shard_size="100KB")
    assert len(s["weights"]) > 1 and s["vqmodel"] == "exported"
    hf2, info = transformers.ChameleonForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    hf2.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    full2, _ = _hf_full_logits(hf2, ids)
    np.testing.assert_allclose(full2, want_text, atol=1e-4, rtol=0)
    np.testing.assert_allclose(full2[..., list(CODE_IDS)], want_image, atol=1e-4, rtol=0)
    assert hf2.config.swin_norm == hfc["swin_norm"] and hf2.config.vocabulary_map == vocab
    # and the exported directory imports again (params = the merged ones), its tokenizer unchanged
    params2, m2 = hc.load_hf_chameleon(out)
    assert m2["code_token_ids"] == CODE_IDS
    assert hc.load_chameleon_tokenizer(out).ids == tok.ids
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        assert "<reserved08708>" in json.load(f)["chat_template"]


def test_vq_encode_matches_transformers(ckpts, tmp_path):
    path, hf = ckpts(False)
    out = str(tmp_path / "vq.safetensors")
    summary = hc.convert_chameleon_vq(path, out)
    assert summary["decoder"] is False and summary["tokens_per_image"] == 256
    cfg, params = load_vq(out)
    assert "decoder" not in params
    with pytest.raises(ValueError, match="no VQGAN decoder.*vqgan.ckpt.*--naming chameleon"):
        hc.require_vq_decoder(params, out)
    from uvjax.towers.vq_codec import VQCodec
    codec = VQCodec(out)  # encodes; decoding says why it cannot
    with pytest.raises(ValueError, match="has no decoder.*--naming chameleon"):
        codec.decode(np.zeros((1, 256), np.int32))
    pixels = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        want = hf.model.vqmodel.encode(pixels).image_tokens.reshape(3, -1).numpy()
    got = np.asarray(VQModel(cfg).apply({"params": params}, jnp.asarray(pixels.permute(0, 2, 3, 1).numpy()),
                                        method=VQModel.encode))
    assert len(np.unique(want)) > 10  # the codebook is in use, not one code everywhere
    np.testing.assert_array_equal(got, want)

    # an Anole-style port with decoder.* tensors converts whole (strict), and its decoder runs
    for key in flatten_params(params):  # the export names invert the import names
        name = ce.flax_vq_key_to_chameleon(key, len(cfg.ch_mult))
        assert chameleon_key_to_flax(name, 4 if key.endswith("kernel") else 1, len(cfg.ch_mult)) == key
    from safetensors.numpy import load_file, save_file
    anole = tmp_path / "anole"
    shutil.copytree(path, anole)
    dec = init_params(cfg, 1, 32)["decoder"]
    index = json.load(open(anole / "model.safetensors.index.json"))
    shard = sorted(set(index["weight_map"].values()))[0]
    t = load_file(str(anole / shard))
    for k, a in flatten_params({"decoder": dec}).items():
        name = hc.VQ_PREFIX + ce.flax_vq_key_to_chameleon(k, len(cfg.ch_mult))
        t[name] = np.ascontiguousarray(a.transpose(3, 2, 0, 1) if k.endswith("kernel") else a)
        index["weight_map"][name] = shard
    save_file(t, str(anole / shard), metadata={"format": "pt"})
    json.dump(index, open(anole / "model.safetensors.index.json", "w"))
    cfg2, params2, has_dec = hc.load_chameleon_vq(str(anole))
    assert has_dec and cfg2.dec_res_blocks == 2
    for k, a in flatten_params({"decoder": dec}).items():
        np.testing.assert_array_equal(flatten_params(params2)[k], a)
    img = VQModel(cfg2).apply({"params": params2}, jnp.asarray(got[:1]), method=VQModel.decode_indices)
    assert img.shape == (1, 32, 32, 3)


def test_errors_name_the_problem(ckpts, tmp_path):
    path, _ = ckpts(False)
    src = tmp_path / "m"
    shutil.copytree(path, src)
    from safetensors.numpy import load_file, save_file
    index = json.load(open(src / "model.safetensors.index.json"))
    where = index["weight_map"]["model.layers.1.self_attn.k_norm.bias"]
    t = load_file(str(src / where))
    bias = t.pop("model.layers.1.self_attn.k_norm.bias")
    t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    save_file(t, str(src / where), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"not used by the uvjax Chameleon decoder.*q_proj\.bias"):
        hc.load_hf_chameleon(str(src))
    del t["model.layers.0.self_attn.q_proj.bias"]
    save_file(t, str(src / where), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors \['k_norm_bias\[layer 1\]'\]"):
        hc.load_hf_chameleon(str(src))
    t["model.layers.1.self_attn.k_norm.bias"] = np.zeros((3, 16), np.float32)
    save_file(t, str(src / where), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"k_norm\.bias has shape \(3, 16\), expected \(2, 16\)"):
        hc.load_hf_chameleon(str(src))
    t["model.layers.1.self_attn.k_norm.bias"] = bias
    save_file(t, str(src / where), metadata={"format": "pt"})

    cfg = json.load(open(src / "config.json"))
    no_img = {k: i for k, i in cfg["vocabulary_map"].items() if not k.startswith("IMGIMG")}
    json.dump({**cfg, "vocabulary_map": no_img}, open(src / "config.json", "w"))
    with pytest.raises(ValueError, match="vocabulary_map has no image tokens"):
        hc.load_hf_chameleon(str(src))
    gap = {k: i for k, i in cfg["vocabulary_map"].items() if k != image_token_name(7)}
    json.dump({**cfg, "vocabulary_map": gap}, open(src / "config.json", "w"))
    with pytest.raises(ValueError, match=r"missing codes \[7\]"):
        hc.model_overrides_from_hf(hc.read_chameleon_config(str(src)))
    json.dump({**cfg, "model_type": "llama"}, open(src / "config.json", "w"))
    with pytest.raises(ValueError, match="model_type='llama' is not a supported Chameleon"):
        hc.load_hf_chameleon(str(src))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hc.load_hf_chameleon(str(tmp_path / "nope"))
    # a config that disagrees with the checkpoint is named field by field
    json.dump(cfg, open(src / "config.json", "w"))
    c = base_config()
    chameleon_preset(c, str(src))
    c.model.norm_placement = "swin"
    c.model.image.code_token_ids = tuple(reversed(CODE_IDS))
    with pytest.raises(ValueError, match=r"model.norm_placement: config 'swin' vs checkpoint 'pre'[\s\S]*code_token_ids"):
        load_base_into_variables({"params": {}}, c)


def test_end_to_end_import_train_with_lora_decode_interleaved_and_export(ckpts, tmp_path):
    """The whole path of a user who brings a Chameleon/Anole checkpoint: a random-init HF Chameleon goes into
    uvjax (``chameleon_preset`` → ``train.run``), trains a few LoRA steps on interleaved records (text,
    then an image inside the answer, then text), decodes an interleaved text+image answer, and goes back out
    to transformers with logits equal to the trained uvjax model's (LoRA merged by the export)."""
    from uvjax import train as T
    from uvjax.data.records import Record, Segment
    from uvjax.data.sequence import SequenceConfig, encode_record
    from uvjax.data.tokenizer import get_template
    from uvjax.inference.decode import DecodeSettings, Generator, SpecialIds, encode_prompt
    from uvjax.inference.loading import load_trained
    from uvjax.export import export_run
    path, _ = ckpts(False)
    c = base_config()
    chameleon_preset(c, path, rank=4, alpha=8.0)
    c.model.dtype, c.model.pretrained.noise = "float32", 0.0
    c.data.image_tokens = 4
    c.train.steps, c.train.batch_size, c.train.seq_len = 4, 8, 48  # FSDP over the 8 test devices
    c.train.checkpoint_every, c.train.log_every, c.train.progress = 4, 1, False
    c.optim.lr, c.optim.warmup_steps = 3e-2, 1
    workdir = str(tmp_path / "run")
    tok = base_tokenizer(c)
    assert tok.vocab_size == V  # Chameleon's own specials: the vocabulary did not grow
    template = get_template(c.data.template, c.data.get("system_prompt", ""))
    seq = SequenceConfig(seq_len=48, image_tokens=4, codebook_size=N_CODES)
    r = np.random.default_rng(0)
    words = lambda n: " ".join(f"w{int(k)}" for k in r.integers(0, 40, n))
    examples = []
    for i in range(8):
        rec = Record(f"r{i}", "gen_reasoning", [
            Segment("user", "text", text=words(3)), Segment("assistant", "text", text=words(2)),
            Segment("assistant", "image", codes=r.integers(0, N_CODES, 4).astype(np.int32)),
            Segment("assistant", "text", text=words(2))])
        examples.append(encode_record(rec, tok, template, seq).arrays)
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    assert (batch["image_target"].sum(1) == 4).all() and (batch["text_target"].sum(1) > 4).all()

    class Batches:  # the same interleaved batch every step (a position, for the checkpoint)
        n = 0

        def __next__(self):
            self.n += 1
            return batch

        def get_state(self):
            return {"n": self.n}

        def set_state(self, state):
            self.n = int(state["n"])

    summary = T.run(c, workdir, data_iterator=Batches())
    assert summary["steps_run"] == 4
    run = load_trained(workdir)
    assert run.model.cfg.shared_vocab and run.model.cfg.image.code_token_ids == CODE_IDS
    lora_b = [np.abs(np.asarray(x)).max() for p, x in jax.tree_util.tree_leaves_with_path(run.variables["lora"])
              if jax.tree_util.keystr(p).endswith("['b']")]
    assert min(lora_b) > 0  # the factors trained (B starts at zero)

    ids = SpecialIds.from_tokenizer(run.tokenizer)
    gen = Generator(run.model, run.variables, ids)
    prompt = encode_prompt(Record("p", "gen_reasoning", [Segment("user", "text", text=words(3))]), run.tokenizer,
                           template)
    s = DecodeSettings(max_new_tokens=24, image_tokens=4, max_images=2, force_image_within=2, temperature=3.0,
                       image_temperature=1.0)
    for seed in range(12):
        kinds = [p["kind"] for p in gen.generate([prompt], s, seed=seed).parts(0, ids)]
        if "image" in kinds and "text" in kinds[kinds.index("image"):] and kinds[0] == "text":
            break
    else:
        raise AssertionError(f"no interleaved text, image, text answer in 12 seeds: {kinds}")

    out = str(tmp_path / "hf")
    export_run(workdir, out, fmt="chameleon")
    hf = transformers.ChameleonForConditionalGeneration.from_pretrained(out).eval()
    b, hf_ids = _mixed(seed=3)
    h = run.model.apply(run.variables, b)
    want_text = np.asarray(run.model.apply(run.variables, h, method=UnifiedModel.text_logits))
    full, _ = _hf_full_logits(hf, hf_ids)
    np.testing.assert_allclose(full, want_text, atol=1e-4, rtol=0)
