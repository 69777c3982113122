"""PEFT LoRA adapters out of and into uvjax, checked against peft's own PeftModel on transformers' Llama."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from uvjax.config import base_config, model_config  # noqa: E402
from uvjax.data.arrays import TEXT  # noqa: E402
from uvjax.data.tokenizer import train_bpe  # noqa: E402
from uvjax.models.lora import PROJECTIONS, merge_lora  # noqa: E402
from uvjax.models.unified import UnifiedModel  # noqa: E402
from uvjax.training.step import dummy_batch  # noqa: E402
from uvjax import export as uvjax_export  # noqa: E402
from uvjax.weights import peft_adapter as pa  # noqa: E402
from uvjax.weights.pretrained import load_base_into_variables  # noqa: E402
from uvjax.config import pretrained_preset

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

VOCAB = 300
DIMS = dict(hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, intermediate=48, rope_base=5000.0,
            rope_scaling=(), norm_eps=1e-6)
HF_MODULES = [pa.HF_MODULE[p].rsplit(".", 1)[1] for p in PROJECTIONS]  # q_proj ... down_proj
IDS = np.random.default_rng(0).integers(0, VOCAB, (3, 20))


def _cfg(*, tie=False, rank=4, alpha=8.0, targets=PROJECTIONS, vocab=VOCAB, layers=2, base=None):
    c = base_config()
    for k, v in {**DIMS, "vocab_size": vocab, "tie_embeddings": tie, "layers": layers}.items():
        c.model[k] = v
    c.model.lora.rank, c.model.lora.alpha, c.model.lora.targets = rank, alpha, tuple(targets)
    c.model.image.num_codes, c.model.image.code_dim = 24, 8
    if base:
        pretrained_preset(c, "hf", str(base), use_tokenizer=False)
    return c


def _init(c, seed=0):
    """Jitted: one compile is several times faster than eager init on the shared CPU."""
    model = UnifiedModel(model_config(c).validate())
    init = jax.jit(lambda k: model.init({"params": k}, dummy_batch(), method=UnifiedModel.init_all))
    return model, nn.unbox(init(jax.random.key(seed)))


def _randomise_lora(v, seed=3, std=0.1):
    """LoRA B starts at zero (the model then equals its base): random factors make the test see them."""
    rng = np.random.default_rng(seed)
    v = dict(v)
    v["lora"] = jax.tree_util.tree_map(lambda x: jnp.asarray(std * rng.standard_normal(x.shape), x.dtype), v["lora"])
    return v


def _uv_logits(model, v, ids):
    B, T = ids.shape
    batch = {"tokens": jnp.asarray(ids, jnp.int32), "modality": jnp.full((B, T), TEXT, jnp.int32),
             "segment_ids": jnp.ones((B, T), jnp.int32), "positions": jnp.tile(jnp.arange(T), (B, 1)),
             "text_target": jnp.zeros((B, T), jnp.int32), "image_target": jnp.zeros((B, T), jnp.int32)}
    fwd = jax.jit(lambda v, b: model.apply(v, model.apply(v, b), method=UnifiedModel.text_logits))
    return np.asarray(fwd(v, batch))


def _torch_logits(m, ids):
    with torch.no_grad():
        return m(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def _hf_base(path, *, tie=False, layers=2, seed=0):
    """A random tiny LlamaForCausalLM saved by transformers (norms randomised so a swap would show)."""
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=DIMS["hidden"], intermediate_size=DIMS["intermediate"], num_hidden_layers=layers,
        num_attention_heads=DIMS["heads"], num_key_value_heads=DIMS["kv_heads"], rms_norm_eps=DIMS["norm_eps"],
        rope_theta=DIMS["rope_base"], tie_word_embeddings=tie, max_position_embeddings=64)).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(str(path))
    return hf


def _peft_adapter(base_path, out, *, r=4, alpha=8, targets=HF_MODULES, seed=1, **kw):
    """An adapter written by peft itself, with random non-zero A and B."""
    hf = transformers.LlamaForCausalLM.from_pretrained(str(base_path)).eval()
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                 task_type="CAUSAL_LM", **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(out))
    return pm.eval()


@pytest.fixture(scope="module")
def tiny():
    """(model, variables) of the default tiny LoRA config (rank 4, alpha 8, every projection), initialised
    once: every config below with these shapes builds the same model."""
    return _init(_cfg())


# =========================================================================================== export
@pytest.mark.parametrize("tie,rank,alpha,targets", [(False, 4, 8.0, PROJECTIONS), (True, 2, 3.0, ("q", "v", "down"))])
def test_export_equals_peft_logits_and_merge(tmp_path, monkeypatch, tiny, tie, rank, alpha, targets):
    c = _cfg(tie=tie, rank=rank, alpha=alpha, targets=targets)
    model, v = tiny if (tie, rank, alpha, targets) == (False, 4, 8.0, PROJECTIONS) else _init(c)
    v = _randomise_lora(v)
    tok = train_bpe(["a unified model reads and writes images", "what is the weather?"] * 20, vocab_size=280)
    out = tmp_path / "adapter"
    s = pa.export_peft(v, model.cfg, tok, str(out), run_config=c)
    assert s["base_model_name_or_path"] == "base" and s["tensors"] == 2 * 2 * len(targets)
    with open(out / "adapter_config.json") as f:
        ac = json.load(f)
    assert (ac["r"], ac["lora_alpha"], ac["peft_type"], ac["task_type"]) == (rank, alpha, "LORA", "CAUSAL_LM")
    assert sorted(ac["target_modules"]) == sorted(pa.HF_MODULE[p].rsplit(".", 1)[1] for p in targets)
    assert os.path.exists(out / "base" / "uvjax_image_modules.safetensors")

    want = _uv_logits(model, v, IDS)
    base = transformers.LlamaForCausalLM.from_pretrained(str(out / "base")).eval()
    pm = peft.PeftModel.from_pretrained(base, str(out)).eval()
    assert pm.peft_config["default"].r == rank
    np.testing.assert_allclose(_torch_logits(pm, IDS), want, atol=1e-4, rtol=0)
    # the LoRA really matters here: the base alone is far from the adapted model
    with pm.disable_adapter():
        assert np.abs(_torch_logits(pm, IDS) - want).max() > 1e-2

    # PEFT's merge equals uvjax's merge_lora, tensor by tensor
    merged = pm.merge_and_unload().state_dict()
    ours = merge_lora(v["params"], v["lora"], model.cfg.decoder.lora)["decoder"]["layers"]
    for p in PROJECTIONS:
        group, name = ("attn", p) if p in ("q", "k", "v", "o") else ("mlp", p)
        for layer in range(2):
            np.testing.assert_allclose(merged[f"model.layers.{layer}.{pa.HF_MODULE[p]}.weight"].numpy(),
                                       np.asarray(ours[group][name]["kernel"][layer]).T, atol=1e-6, err_msg=p)

    # AutoPeftModel resolves the relative "base" against the current directory (documented)
    monkeypatch.chdir(out)
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(".").eval()
    np.testing.assert_allclose(_torch_logits(auto, IDS), want, atol=1e-4, rtol=0)
    assert transformers.AutoTokenizer.from_pretrained(".")("weather", add_special_tokens=False)["input_ids"] == \
        tok.encode("weather")


def test_export_on_the_users_hf_base(tmp_path, tiny):
    """--base: a run started from an HF checkpoint; only the adapter (+ image side) is written, and
    PEFT on the user's own base directory computes the run."""
    src = tmp_path / "hf"
    _hf_base(src)
    c = _cfg(base=src)
    model, v = tiny
    v = _randomise_lora(load_base_into_variables(v, c))
    out = tmp_path / "adapter"
    s = pa.export_peft(v, model.cfg, None, str(out), base_dir=str(src))
    assert not os.path.exists(out / "base") and os.path.exists(out / "uvjax_image_modules.safetensors")
    assert s["base_model_name_or_path"] == str(src)
    pm = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(str(src)), str(out)).eval()
    np.testing.assert_allclose(_torch_logits(pm, IDS), _uv_logits(model, v, IDS), atol=1e-4, rtol=0)

    # the run's base is not the user's: refused, naming the tensor
    v2 = jax.tree_util.tree_map(lambda x: x, v)
    k = v2["params"]["decoder"]["layers"]["mlp"]["up"]["kernel"]
    v2["params"]["decoder"]["layers"]["mlp"]["up"]["kernel"] = k.at[1, 0, 0].add(0.5)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight differs"):
        pa.export_peft(v2, model.cfg, None, str(tmp_path / "x"), base_dir=str(src))
    # grown vocabulary (<boi>/<eoi> rows): not LoRA on the user's base
    p3 = {**v["params"], "embed": {"embedding": np.pad(np.asarray(v["params"]["embed"]["embedding"]), ((0, 2), (0, 0)))},
          "lm_head": {"kernel": np.pad(np.asarray(v["params"]["lm_head"]["kernel"]), ((0, 0), (0, 2)))}}
    with pytest.raises(ValueError, match=r"vocab_size: run 302 vs base 300.*export without --base"):
        pa.export_peft({"params": p3, "lora": v["lora"]}, model_config(_cfg(vocab=VOCAB + 2)), None,
                       str(tmp_path / "y"), base_dir=str(src))


def test_export_refuses_what_peft_cannot_hold(tmp_path, tiny):
    model, v = tiny
    with pytest.raises(ValueError, match="no LoRA factors"):
        pa.export_peft({"params": v["params"]}, model_config(_cfg(rank=0)), None, str(tmp_path / "a"))
    c = _cfg()
    c.model.qk_norm = True
    with pytest.raises(ValueError, match="Chameleon decoder"):
        pa.export_peft(v, model_config(c), None, str(tmp_path / "b"))
    lora = jax.tree_util.tree_map(lambda x: x, v["lora"])
    lora["decoder"]["layers"]["attn"]["qkv"] = {"a": np.zeros((2, 32, 4)), "b": np.zeros((2, 4, 64))}
    with pytest.raises(ValueError, match=r"cannot express .*decoder/layers/attn/qkv/a"):
        pa.export_peft({**v, "lora": lora}, model.cfg, None, str(tmp_path / "c"))
    del lora["decoder"]["layers"]["attn"]["qkv"], lora["decoder"]["layers"]["mlp"]["up"]
    with pytest.raises(ValueError, match=r"lacks \['decoder/layers/mlp/up/a'"):
        pa.export_peft({**v, "lora": lora}, model.cfg, None, str(tmp_path / "d"))
    assert not os.path.exists(tmp_path / "c")  # nothing written on refusal


def test_cli_on_a_run(tmp_path, monkeypatch, capsys, tiny):
    """``python -m uvjax.weights.peft_adapter`` plumbing (run loading replaced by the tiny model: training a
    run is covered by test_weights_hf); bf16 storage rounds each factor as ml_dtypes does."""
    import ml_dtypes

    from uvjax.inference import loading
    c = _cfg()
    model, v = tiny
    v = _randomise_lora(v, seed=5)
    monkeypatch.setattr(loading, "load_trained", lambda workdir, step=None: loading.LoadedRun(
        cfg=c, model=model, variables=v, tokenizer=train_bpe(["a tiny run", "the weather"] * 20, vocab_size=280),
        step=7, workdir=workdir))
    out = tmp_path / "out"
    uvjax_export.main(["--format=peft", "--workdir", str(tmp_path / "run"), "--out", str(out), "--dtype", "bfloat16"])
    s = json.loads(capsys.readouterr().out)
    assert s["step"] == 7 and s["base_model_name_or_path"] == "base" and s["base"]["dtype"] == "bfloat16"
    with open(out / "uvjax_config.json") as f:
        assert json.load(f)["model"]["lora"]["rank"] == 4
    back = pa.load_peft_adapter(str(out), c)
    for path, x in jax.tree_util.tree_leaves_with_path(v["lora"]):
        want = np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32)
        got = back
        for k in path:
            got = got[k.key]
        np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))
    with pytest.raises(FileExistsError, match="not empty"):
        uvjax_export.main(["--format=peft", "--workdir", str(tmp_path / "run"), "--out", str(out)])


# =========================================================================================== import
def test_import_equals_peft_logits(tmp_path, tiny):
    src, ad = tmp_path / "hf", tmp_path / "adapter"
    _hf_base(src)
    pm = _peft_adapter(src, ad)
    c = _cfg(base=src)
    c.model.pretrained.peft_adapter = str(ad)
    model, v = tiny
    v = load_base_into_variables(v, c)
    assert np.abs(np.asarray(v["lora"]["decoder"]["layers"]["mlp"]["down"]["b"])).min() > 0  # B from the adapter
    np.testing.assert_allclose(_uv_logits(model, v, IDS), _torch_logits(pm, IDS), atol=1e-4, rtol=0)
    # back out again: the factors PEFT wrote come back unchanged
    pa.export_peft(v, model.cfg, None, str(tmp_path / "again"), base_dir=str(src))
    from safetensors.numpy import load_file
    a, b = load_file(str(ad / "adapter_model.safetensors")), load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_import_errors_name_the_mismatch(tmp_path):
    src, ad = tmp_path / "hf", tmp_path / "adapter"
    _hf_base(src, layers=3)
    _peft_adapter(src, ad, targets=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match=r"model\.lora\.rank=8 vs the adapter's r=4"):
        pa.load_peft_adapter(str(ad), _cfg(rank=8, layers=3, targets=("q", "v")))
    with pytest.raises(ValueError, match=r"model\.lora\.alpha=16.0 vs the adapter's lora_alpha=8"):
        pa.load_peft_adapter(str(ad), _cfg(alpha=16.0, layers=3, targets=("q", "v")))
    with pytest.raises(ValueError, match=r"model\.lora\.targets=\['q', 'k', 'v', 'o', 'gate', 'up', 'down'\] "
                                         r"vs the adapter's \['q', 'v'\]"):
        pa.load_peft_adapter(str(ad), _cfg(layers=3))
    with pytest.raises(ValueError, match=r"layers\.2\.self_attn\.\w_proj\.lora_\w\.weight is layer 2, but the model "
                                         r"has 2 layers"):
        pa.load_peft_adapter(str(ad), _cfg(targets=("q", "v")))
    c = _cfg(layers=3, targets=("q", "v"))
    c.model.kv_heads = 4  # v_proj: 4 x 8 outputs instead of 2 x 8
    with pytest.raises(ValueError, match=r"v_proj\.lora_B\.weight has shape \(16, 4\), expected \(32, 4\)"):
        pa.load_peft_adapter(str(ad), c)
    # and through the config key: the message names it
    c = _cfg(base=src, layers=3, rank=8, targets=("q", "v"))
    c.model.pretrained.peft_adapter = str(ad)
    with pytest.raises(ValueError, match=r"pretrained\.peft_adapter: .* model\.lora\.rank=8"):
        load_base_into_variables({"params": {}}, c)  # refused before any variable is touched
    c.model.pretrained.peft_adapter = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="peft_adapter: PEFT adapter directory .*nope.* does not exist"):
        load_base_into_variables({"params": {}}, c)
    dora = tmp_path / "dora"
    _peft_adapter(src, dora, targets=["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match=r"cannot hold use_dora=True \(DoRA\)"):
        pa.load_peft_adapter(str(dora), _cfg(layers=3, targets=("q",)))


def test_training_run_starts_from_the_adapter(tmp_path, monkeypatch):
    """``uvjax.train.run`` with ``pretrained.peft_adapter`` set: the state the run trains from holds the
    adapter's factors as peft holds them (8-device fsdp shardings). The state is read as the trainer's
    fresh-run hook returns it, before any update, and the run is stopped there: compiling a train step
    would add a minute and check nothing more about the import."""
    from datasets import make_code_dataset

    from uvjax.config import load_config_file, lora_preset
    from uvjax.train import run
    from uvjax.training.optimizer import merge_variables
    from uvjax.weights import pretrained
    ds = make_code_dataset(str(tmp_path / "data"), num_images=8)
    c = load_config_file("vqvq", "smoke")
    m = c.model
    src, ad = tmp_path / "hf", tmp_path / "adapter"
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=int(m.vocab_size), hidden_size=int(m.hidden), intermediate_size=int(m.intermediate),
        num_hidden_layers=int(m.layers), num_attention_heads=int(m.heads), num_key_value_heads=int(m.kv_heads),
        rms_norm_eps=float(m.norm_eps), rope_theta=float(m.rope_base), tie_word_embeddings=bool(m.tie_embeddings)))
    hf.save_pretrained(str(src))
    pm = _peft_adapter(src, ad, r=4, alpha=8)
    c.data.tokenizer = ds["tokenizer"]
    c.data.streams.understanding.paths = (ds["paths"]["understanding"],)
    c.data.streams.generation.paths = (ds["paths"]["generation"],)
    c.stages.build = False
    c.train.steps, c.train.progress, c.train.async_checkpoint = 1, False, False
    c.mesh.shape = (1, -1, 1)  # the 8 fake test devices: the factors land on fsdp-sharded LoRA leaves
    lora_preset(c, 4, 8.0)
    pretrained_preset(c, "hf", str(src), use_tokenizer=False)
    c.model.pretrained.peft_adapter = str(ad)
    seen = []
    hook = pretrained.load_base_into_state

    class Started(Exception):
        pass

    def capture(state, trainer, cfg):
        seen.append(hook(state, trainer, cfg))
        raise Started

    monkeypatch.setattr(pretrained, "load_base_into_state", capture)
    with pytest.raises(Started):
        run(c, str(tmp_path / "run"), progress=False)
    assert len(seen) == 1
    lora = merge_variables(seen[0].trainable, seen[0].frozen)["lora"]["decoder"]["layers"]
    layers = pm.base_model.model.model.layers
    for layer in range(int(m.layers)):
        for p in PROJECTIONS:
            group = "attn" if p in ("q", "k", "v", "o") else "mlp"
            mod = getattr(getattr(layers[layer], "self_attn" if group == "attn" else "mlp"), pa.HF_MODULE[p].split(".")[1])
            np.testing.assert_array_equal(np.asarray(lora[group][p]["a"][layer]),
                                          mod.lora_A["default"].weight.detach().numpy().T)
            np.testing.assert_array_equal(np.asarray(lora[group][p]["b"][layer]),
                                          mod.lora_B["default"].weight.detach().numpy().T)


def test_the_adapter_key_enters_the_lm_fingerprint_only_when_set():
    """Runs from before the key existed keep their LM fingerprint (no retraining); a set adapter changes it."""
    import ml_collections as mlc
    from uvjax.training.workdir import lm_fingerprint
    from uvjax.config import pretrained_preset
    from helpers import tiny_config
    c = tiny_config()
    pretrained_preset(c, "gguf", "smollm2")
    assert c.model.pretrained.peft_adapter == ""
    old = mlc.ConfigDict(c.to_dict())
    del old.model.pretrained["peft_adapter"]
    assert lm_fingerprint(c) == lm_fingerprint(old)
    c.model.pretrained.peft_adapter = "/some/adapter"
    assert lm_fingerprint(c) != lm_fingerprint(old)


def test_the_export_command_has_a_peft_format(monkeypatch, tmp_path):
    """``python -m uvjax.export --format=peft`` is the PEFT exporter with the same arguments; --base is
    refused for the other formats."""
    from uvjax import export
    seen = {}
    monkeypatch.setattr(export, "export_peft_run", lambda wd, out, **kw: seen.update(wd=wd, out=out, **kw) or {})
    export.main(["--workdir", "RUN", "--out", str(tmp_path / "o"), "--format=peft", "--base", "HF", "--step", "7"])
    assert seen == {"wd": "RUN", "out": str(tmp_path / "o"), "step": 7, "base": "HF", "dtype": None, "overwrite": False}
    with pytest.raises(SystemExit):
        export.main(["--workdir", "RUN", "--out", str(tmp_path / "o"), "--base", "HF"])
