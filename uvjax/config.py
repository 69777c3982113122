"""Config building blocks shared by ``configs/*.py`` (ml_collections, config files as code).

``base_config()`` holds every knob with its default; variant files (vqvq, siglipvq, ...) change a few
and add presets. ``validate(cfg)`` runs at start and names the bad key. ``model_config(cfg)`` turns the
``model`` section into the frozen dataclasses the Flax modules take.
"""
from __future__ import annotations

import ml_collections as mlc

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
    t.eval_every = 0  # quick evaluation every N steps (0 = only the final evaluation of the stages)
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
    # pretrained vision towers for imported data (uvjax/stages_imported.py): an HF SiglipVisionModel /
    # CLIPVisionModel directory or a uvjax tower file; the Smart Watch chain pretrains its own instead
    c.towers = mlc.ConfigDict(dict(
        siglip=mlc.ConfigDict(dict(preset="", path="", select_layer=-2, feature_post_norm=False)),
        clip=mlc.ConfigDict(dict(preset="", path="", select_layer=-2, feature_post_norm=False))))
    from uvjax.stages import stages_config
    c.stages = stages_config()
    # standard FID: the user's FID Inception weight file (pytorch-fid's .pth, or its .safetensors/.npz
    # conversion; docs/WEIGHTS.md); "" = off. Outside every fingerprint: evaluation only.
    c.stages.evaluate.inception_path = ""
    c.stages.build = False  # variant presets that render their own data switch this on
    return c


def resolve_config_argv(argv: list[str]) -> list[str]:
    """``--config=configs/x.py[:preset]`` works from any current directory: a relative config path that
    does not exist there is taken relative to the uvjax checkout (where ``configs/`` lives)."""
    import os
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
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", f"{name}.py")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} not found (uvjax expects its source checkout)")
    spec = importlib.util.spec_from_file_location(f"uvjax_configs_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def data_config() -> mlc.ConfigDict:
    try:
        from uvjax.data.pipeline import default_data_config
    except ImportError:  # the data package is optional for model-only use
        return mlc.ConfigDict()
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
