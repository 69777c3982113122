"""The Chameleon/Anole shared-vocabulary layout: codes as vocabulary rows, per-head q/k norm, swin norm
placement, the image CE over image rows or the whole vocabulary, and the code <-> token-id map read from
the tokenizer's names. Every number against a float64 NumPy reference written from the definitions."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers

from helpers import random_batch, tiny_config
from reference import decoder_forward, log_softmax
from uvjax.config import lora_preset, model_config, validate
from uvjax.data.arrays import IMAGE_IN, IMAGE_OUT
from uvjax.data.tokenizer import (TextTokenizer, image_code_ids, image_token_code, image_token_name, train_bpe,
                                  with_image_tokens)
from uvjax.models.unified import UnifiedModel
from uvjax.training import loss as L
from uvjax.training.step import dummy_batch, make_loss_fn

V, K = 96, 24
# code c -> vocabulary id: scattered over 40..95 in no order, so an offset assumption cannot pass
IDS = tuple(int(i) for i in np.random.default_rng(11).choice(np.arange(40, 96), K, replace=False))


def _config(**over):
    base = {"model.image.layout": "shared_vocab", "model.image.code_token_ids": IDS, "model.qk_norm": True,
            "model.rope_base": 1000.0}
    return tiny_config(**{**base, **over})


def _init(model, seed=0):
    v = nn.unbox(model.init({"params": jax.random.key(seed)}, dummy_batch(), method=UnifiedModel.init_all))
    # random norms (1/0 at init would hide a swapped scale/bias or a norm applied at the wrong place)
    leaves, tdef = jax.tree_util.tree_flatten_with_path(v)
    keys = iter(jax.random.split(jax.random.key(seed + 100), len(leaves)))
    out = []
    for path, x in leaves:
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            x = x + 0.5 * jax.random.normal(next(keys), x.shape)
        out.append(x)
    return jax.tree_util.tree_unflatten(tdef, out)


def _np(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), tree)


@pytest.mark.parametrize("placement", ["pre", "swin"])
def test_forward_matches_float64_reference(placement):
    """Image positions (in and out) enter through the text embedding row of their code's token id;
    q/k get Chameleon's per-head LayerNorm; the layer norms sit where ``placement`` says."""
    c = _config(**{"model.norm_placement": placement})
    lora_preset(c, 4, 8.0)
    model = UnifiedModel(model_config(c).validate())
    v = _init(model)
    v["lora"] = jax.tree_util.tree_map(lambda x: 0.1 * jax.random.normal(jax.random.key(x.size), x.shape), v["lora"])
    assert set(v["params"]) == {"embed", "decoder", "lm_head"}  # no adapters, codebook or generation head
    batch = random_batch(np.random.default_rng(0), 2, 12, K, V)
    h = np.asarray(model.apply(v, {k: jnp.asarray(x) for k, x in batch.items()}))
    p, lo = _np(v["params"]), _np(v["lora"])
    emb = p["embed"]["embedding"]
    layers = [jax.tree_util.tree_map(lambda x: x[i], p["decoder"]["layers"]) for i in range(2)]
    lora_layers = [jax.tree_util.tree_map(lambda x: x[i], lo["decoder"]["layers"]) for i in range(2)]
    for b in range(2):
        rows = [IDS[t] if m in (IMAGE_IN, IMAGE_OUT) else t for t, m in zip(batch["tokens"][b], batch["modality"][b])]
        want = decoder_forward(emb[rows], batch["segment_ids"][b], batch["positions"][b], layers,
                               p["decoder"]["final_norm"]["scale"], heads=4, kv_heads=2, base=1000.0, eps=1e-5,
                               lora_layers=lora_layers, scale=2.0, placement=placement)
        np.testing.assert_allclose(h[b], want, atol=3e-5)
    # image logits: the LM head's rows of the codes' token ids, in code order
    il = np.asarray(model.apply(v, jnp.asarray(h[0]), method=UnifiedModel.image_logits))
    np.testing.assert_allclose(il, h[0].astype(np.float64) @ p["lm_head"]["kernel"][:, list(IDS)], atol=2e-5)


def _reference_loss(batch, h, W, image_ce, w_image):
    """Straight loops, float64: text CE over the whole vocabulary at text targets; image CE at image
    targets over the image rows (label = the code) or over the whole vocabulary (label = its token id)."""
    text, img = [], []
    B, T = batch["tokens"].shape
    for b in range(B):
        for t in range(T - 1):
            s0, s1 = batch["segment_ids"][b, t], batch["segment_ids"][b, t + 1]
            if not (s1 and s0 == s1):
                continue
            y, lg = batch["tokens"][b, t + 1], h[b, t].astype(np.float64) @ W
            if batch["text_target"][b, t + 1]:
                text.append(-log_softmax(lg)[y])
            if batch["image_target"][b, t + 1]:
                img.append(-log_softmax(lg[list(IDS)])[y] if image_ce == "image_rows" else -log_softmax(lg)[IDS[y]])
    return np.mean(text) + w_image * np.mean(img)


@pytest.mark.parametrize("image_ce", ["image_rows", "full_vocab"])
@pytest.mark.parametrize("fused", [0, 8])
def test_loss_matches_float64(image_ce, fused):
    """The train step's loss function (both CE options, chunked-fused head or plain logits) against loops
    over every target pair. The two options differ (the full-vocabulary partition also holds the text rows)."""
    c = _config(**{"model.image.image_ce": image_ce, "loss.fused_head_chunk": fused, "loss.w_image": 0.7})
    model = UnifiedModel(model_config(c).validate())
    v = _init(model)
    batch = random_batch(np.random.default_rng(1), 3, 14, K, V)
    jb = {k: jnp.asarray(x) for k, x in batch.items()}
    loss, sums = make_loss_fn(model, c)(v, {}, jb, L.global_counts(jb), jax.random.key(0))
    h = np.asarray(model.apply(v, jb))
    want = _reference_loss(batch, h, np.asarray(v["params"]["lm_head"]["kernel"], np.float64), image_ce, 0.7)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)
    other = _reference_loss(batch, h, np.asarray(v["params"]["lm_head"]["kernel"], np.float64),
                            "full_vocab" if image_ce == "image_rows" else "image_rows", 0.7)
    assert abs(other - want) > 1e-3


def test_gradients_reach_only_the_rows_they_should():
    """image_rows: an image target's gradient reaches the LM head's image columns only (plus the trunk);
    the text columns get gradient only from text targets. Checked on a batch with image targets only."""
    c = _config(**{"model.image.image_ce": "image_rows"})
    model = UnifiedModel(model_config(c).validate())
    v = _init(model)
    batch = random_batch(np.random.default_rng(2), 2, 12, K, V)
    batch["text_target"][:] = 0
    jb = {k: jnp.asarray(x) for k, x in batch.items()}
    g = jax.grad(lambda p: make_loss_fn(model, c)({"params": p}, {}, jb, L.global_counts(jb),
                                                  jax.random.key(0))[0])(v["params"])
    gh = np.abs(np.asarray(g["lm_head"]["kernel"])).sum(0)
    image_cols = np.zeros(V, bool)
    image_cols[list(IDS)] = True
    assert (gh[~image_cols] == 0).all() and (gh[image_cols] > 0).sum() >= K // 2


def test_image_token_names_and_the_map_from_a_tokenizer():
    assert image_token_name(0) == "IMGIMGAZ" and image_token_name(8191) == "IMGIMGIBJBZ"
    assert image_token_code("IMGIMGBCDZ") == 123 and image_token_code("IMGIMGxZ") is None
    assert image_token_code("<eoss>") is None
    # a tokenizer written from the format (WordLevel), image tokens at scattered ids
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<boi>": 4, "<eoi>": 5, "<|im_start|>": 6,
             "<|im_end|>": 7, "a": 8}
    order = np.random.default_rng(0).permutation(6)
    for i, code in enumerate(order):
        vocab[image_token_name(int(code))] = 20 + 3 * i
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tt = TextTokenizer.from_tokenizers(tok, bos="<s>", eos="</s>", pad="<pad>")
    ids = image_code_ids(tt, 6)
    assert ids == tuple(20 + 3 * int(np.where(order == c)[0][0]) for c in range(6))
    assert with_image_tokens(tt, 6) is tt  # has them: unchanged
    with pytest.raises(ValueError, match="missing \\[6"):
        image_code_ids(tt, 8)
    with pytest.raises(ValueError, match="beyond the codebook"):
        image_code_ids(tt, 4)


def test_image_tokens_appended_to_a_trained_tokenizer_are_special():
    bpe = train_bpe(["the weather is sunny", "battery in the top left corner"] * 20, vocab_size=300)
    tt = with_image_tokens(bpe, 16)
    assert tt.vocab_size == bpe.vocab_size + 16
    ids = image_code_ids(tt, 16)
    assert sorted(ids) == list(range(bpe.vocab_size, bpe.vocab_size + 16))
    assert tt.decode([ids[5]]) == image_token_name(5)
    with pytest.raises(ValueError, match="special-token string"):
        tt.encode("look: " + image_token_name(3))
    assert not set(tt.encode("IMGIMG battery")) & set(ids)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="input_kind and output_kind 'codes'"):
        validate(_config(**{"model.image.input_kind": "features", "model.image.feature_dim": 4}))
    with pytest.raises(ValueError, match="maps 3 codes"):
        validate(_config(**{"model.image.code_token_ids": (40, 41, 42)}))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        validate(_config(**{"model.image.code_token_ids": tuple(range(90, 90 + K))}))
    with pytest.raises(ValueError, match="model.image.image_ce"):
        validate(_config(**{"model.image.image_ce": "all"}))
    with pytest.raises(ValueError, match="model.norm_placement"):
        validate(_config(**{"model.norm_placement": "post"}))
    model = UnifiedModel(model_config(_config(**{"model.image.code_token_ids": ()})).validate())
    with pytest.raises(ValueError, match="code_token_ids"):
        model.init({"params": jax.random.key(0)}, dummy_batch(), method=UnifiedModel.init_all)


def test_knowledge_transfer_probe_reads_the_code_rows_of_the_embedding():
    """The probe's input representation in this layout is what enters the model for a code: its row of
    the text embedding (the two-head layout's codebook vector)."""
    from types import SimpleNamespace
    from uvjax.experiments.knowledge_transfer import probe_features
    model = UnifiedModel(model_config(_config()).validate())
    v = _init(model)
    codes = np.random.default_rng(4).integers(0, K, (3, 5))
    f = probe_features(SimpleNamespace(model=model, variables=v), codes, batch=4)
    emb = np.asarray(v["params"]["embed"]["embedding"], np.float64)
    want = np.stack([emb[[IDS[c] for c in row]].mean(0) for row in codes])
    np.testing.assert_allclose(f["adapter_in_mean"], want, rtol=1e-6, atol=1e-7)
    assert f["llm_hidden_mean"].shape == (3, 32)
