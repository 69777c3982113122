"""The stage graph for other people's data: import → tokenizer → VQ → pre-tokenise → (train → evaluate).

Selected by ``stages.source.kind = "imported"``: ``stages.source.train`` (and ``.test`` for a held-out split)
name LLaVA/ShareGPT4V JSON files, caption files (``format="caption_generation"``), UnifiedVisual/HF parquet
(``format="unifiedvisual"``), or shards already written by ``python -m uvjax.data.formats convert``
(``format="shards"``); ``image_dir`` / ``test_image_dir`` are their image folders. Every node is cached by
fingerprint in ``<cache_dir>/<stage>-<fp>/`` exactly as the Smart Watch chain (``uvjax.stages``):

    import-train, import-test   formats.convert (input files fingerprinted by path, size and mtime)
    tokenizer                   BPE trained on the imported training texts, or the base model's
    vq                          ``stages.source.vq`` (e.g. a converted LlamaGen VQ-16) as given, else
                                uvjax's VQ (``stages.vq``) trained on the imported training images
    dataset                     ``uvjax.pretokenise`` of both splits (resumable by chunk)
    lengths                     each pre-tokenised record's length and target positions under the run's
                                template; the start of every run reports how many records ``seq_len``
                                truncates or strips of their targets, per stream and reason

The user's data is never swapped for anything else: the config's streams point at these shards, and a
config that sets ``data.streams.*.paths`` itself is refused while the stages build (``uvjax.stages``).
Skipped records (``on_error="skip"``) are counted per reason at import and at pre-tokenisation and
printed; nothing else is dropped.
"""
from __future__ import annotations

import glob
import json
import os

import ml_collections as mlc
import numpy as np

FORMATS = ("llava", "caption_generation", "unifiedvisual", "shards")


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


def is_imported(sc) -> bool:
    src = sc.get("source")
    return src is not None and str(src.get("kind", "smartwatch")) == "imported"


def _files(spec: str, fmt: str) -> list[str]:
    items = [s for s in str(spec).split(",") if s.strip()]
    out: list[str] = []
    for it in items:
        it = os.path.abspath(os.path.expanduser(it.strip()))
        if os.path.isdir(it):
            pats = {"unifiedvisual": ("*.parquet",), "shards": ("*.array_record",)}.get(fmt, ("*.json", "*.jsonl"))
            found = sorted(p for pat in pats for p in glob.glob(os.path.join(it, pat)))
        elif any(ch in it for ch in "*?["):
            found = sorted(glob.glob(it))
        else:
            found = [it] if os.path.exists(it) else []
        if not found:
            raise FileNotFoundError(f"stages.source: no {fmt} input found at {it!r}")
        out += [p for p in found if p not in out]
    return out


def _file_stamp(paths: list[str]) -> list:
    return [[p, os.path.getsize(p), os.stat(p).st_mtime_ns] for p in paths]


def _import_split(src, split: str, cache: str, log, say) -> tuple[str, str, dict]:
    """(shard directory, fingerprint, import counts) of one split."""
    from uvjax.stages import cached_stage, fingerprint
    fmt = str(src.format)
    if fmt not in FORMATS:
        raise ValueError(f"stages.source.format={fmt!r}; expected one of {FORMATS}")
    spec = src.train if split == "train" else src.test
    files = _files(spec, fmt)
    image_dir = str(src.image_dir if split == "train" else (src.test_image_dir or src.image_dir))
    image_dir = os.path.abspath(os.path.expanduser(image_dir)) if image_dir else ""
    if fmt == "shards":  # converted by the user: used in place
        d = os.path.dirname(files[0])
        return d, fingerprint("shards", _file_stamp(files), image_dir), {"files": files}
    fp = fingerprint("import", fmt, _file_stamp(files), image_dir, str(src.on_error), int(src.seed))

    def build(out: str) -> dict:
        from uvjax.data import formats
        for p in os.listdir(out):  # a killed conversion starts over (it is one streaming pass)
            os.remove(os.path.join(out, p))
        opts = {"seed": int(src.seed)} if fmt == "caption_generation" else {}
        res = formats.convert(files, out, format=fmt, image_dir=image_dir, prefix=split,
                              on_error=str(src.on_error), **opts)
        return {"counts": res["counts"], "paths": res["paths"], "image_dir": image_dir, "files": files}

    out, info = cached_stage(f"import-{split}", fp, cache, build, log, say)
    counts = info.get("counts", {})
    if say:
        sk = counts.get("skipped") or {}
        msg = (f"import-{split}: {counts.get('read', '?')} records read, {counts.get('kept', '?')} kept"
               + (f", SKIPPED {sum(sk.values())}: " + ", ".join(f"{k} {v}" for k, v in sorted(sk.items())) if sk else ""))
        say(msg)
    return out, fp, counts


def _shards(d: str, split: str | None = None) -> list[str]:
    pat = f"{split}-*.array_record" if split else "*.array_record"
    return sorted(glob.glob(os.path.join(d, pat)))


def _texts(shards: list[str], limit: int = 200_000) -> list[str]:
    from uvjax.data.storage import RecordReader
    out = []
    for rec in RecordReader(shards):
        out += [s.text for s in rec.segments if s.kind == "text" and s.text]
        if len(out) >= limit:
            break
    return out


def _train_images(shards: list[str], n: int, size: int, resize: str) -> np.ndarray:
    """Up to ``n`` distinct training images, loaded and preprocessed as the pre-tokenisation will."""
    from uvjax import pretokenise as pt
    from uvjax.data.storage import RecordReader
    root = pt.image_root_of(shards)
    seen, imgs = set(), []
    for rec in RecordReader(shards):
        for s in rec.images():
            key = s.path if s.path is not None else id(s.pixels)
            if key in seen:
                continue
            seen.add(key)
            try:
                px = (pt.read_image_file(os.path.join(root, s.path) if root else s.path, pt.ImagePolicy())[0]
                      if s.path is not None else np.asarray(s.pixels))
            except pt.ImageError:
                continue  # the pre-tokenisation pass names (or counts) bad images; the VQ just needs good ones
            imgs.append(pt.preprocess(px, size, resize))
            if len(imgs) >= n:
                return np.stack(imgs)
    if not imgs:
        raise ValueError(f"no readable training image in {shards[:3]}... to train the VQ tokenizer on")
    return np.stack(imgs)


def feature_tower(cfg):
    """(name, config) of the vision tower that encodes feature images: ``towers.clip`` or ``towers.siglip``
    with a ``path`` (an HF vision-model directory, or a uvjax tower file)."""
    towers = cfg.get("towers") or {}
    for name in ("clip", "siglip"):
        t = towers.get(name)
        if t is not None and str(t.get("path", "")):
            return name, t
    raise ValueError("this architecture reads or writes SigLIP/CLIP features, and imported images need a "
                     "pretrained tower: set --config.towers.siglip.path= (or towers.clip.path=) to an HF "
                     "SiglipVisionModel/CLIPVisionModel directory or a uvjax tower file (siglip.safetensors)")


def prepare_imported(cfg, workdir: str, *, progress: bool = True) -> tuple[mlc.ConfigDict, dict]:
    """Builds or reuses the imported-data stages; returns the config pointed at them and the stage paths."""
    from uvjax import pretokenise as pt
    from uvjax.stages import StageLog, _bar, _jsonable, cached_stage, fingerprint, stage_cache_dir
    sc = cfg.stages
    src = sc.source
    im = cfg.model.image
    if not str(src.train):
        raise ValueError("stages.source.kind='imported' needs stages.source.train (a LLaVA JSON, parquet, or "
                         "a directory of converted shards)")
    kinds = {"user": str(im.input_kind), "assistant": str(im.output_kind)}
    uses_codes = "codes" in kinds.values()
    tower_name, tower = feature_tower(cfg) if "features" in kinds.values() else (None, None)
    if uses_codes and not str(src.vq) and (int(im.num_codes) != int(sc.vq.model.codebook_size)
                            or int(im.code_dim) != int(sc.vq.model.code_dim)):
        raise ValueError(f"model.image.num_codes/code_dim={im.num_codes}/{im.code_dim} but the VQ the stages would "
                         f"train (stages.vq.model) has {sc.vq.model.codebook_size}/{sc.vq.model.code_dim}: set "
                         "stages.source.vq to a converted VQ tokenizer (e.g. LlamaGen VQ-16 for 16384 codes) or "
                         "make them equal")
    cache = stage_cache_dir(sc, workdir)
    log = StageLog(workdir)
    say = (lambda m: print(f"[stage] {m}", flush=True)) if progress else None
    size = int(sc.data.image_size)
    tr_dir, tr_fp, tr_counts = _import_split(src, "train", cache, log, say)
    te_dir = te_fp = None
    if str(src.test):
        te_dir, te_fp, _ = _import_split(src, "test", cache, log, say)
    tr_shards = _shards(tr_dir)
    if not tr_shards:
        raise ValueError(f"import-train wrote no records ({tr_dir}); see the skip counts above")

    # text tokenizer: the base model's, or a BPE trained on the imported texts
    from uvjax.data.tokenizer import template_texts, train_bpe
    from uvjax.weights.pretrained import pretrained_spec, save_base_tokenizer
    base = pretrained_spec(cfg)
    tok_fp = fingerprint("tokenizer-imported", sc.tokenizer, tr_fp, cfg.data.template,
                         _jsonable(cfg.model.get("pretrained")) if base else None)

    def build_tok(out: str) -> dict:
        if base:
            return save_base_tokenizer(cfg, out)
        tok = train_bpe(_texts(tr_shards) + template_texts(), vocab_size=int(sc.tokenizer.vocab_size))
        tok.save(out)
        return {"vocab_size": tok.vocab_size, "template": str(cfg.data.template)}

    tok_dir, tok_info = cached_stage("tokenizer", tok_fp, cache, build_tok, log, say)

    # VQ tokenizer: given, or trained on the imported images (only when some image is codes)
    vq_dir = vq_fp = None
    vq_resize = str(src.resize) or "center_crop"
    if not uses_codes:
        pass
    elif str(src.vq):
        from uvjax.inference.decode import VQ_FILE
        vq_path = os.path.abspath(str(src.vq))
        vq_file = os.path.join(vq_path, VQ_FILE) if os.path.isdir(vq_path) else vq_path
        if not os.path.isfile(vq_file):
            raise FileNotFoundError(f"stages.source.vq={src.vq!r}: no {VQ_FILE} there")
        vq_dir, vq_fp = vq_file, fingerprint("vq-file", _file_stamp([vq_file]))
        log.write(stage="vq", fingerprint=vq_fp, reused=True, seconds=0.0, path=vq_file)
    else:
        vq_fp = fingerprint("vq-imported", sc.vq, size, tr_fp, vq_resize, int(src.vq_images))

        def build_vq(out: str) -> dict:
            from uvjax.training.vq_train import train_vq
            vq_cfg = sc.vq.copy_and_resolve_references()
            with vq_cfg.unlocked():
                vq_cfg.data.image_size = size
            n = int(src.vq_images) or int(vq_cfg.data.num_train + vq_cfg.data.num_eval)
            images = _train_images(tr_shards, n, size, vq_resize)
            with vq_cfg.unlocked():  # held-out images for its PSNR: the last num_eval (at most a quarter)
                vq_cfg.data.num_eval = max(1, min(int(vq_cfg.data.num_eval), len(images) // 4))
                vq_cfg.data.num_train = len(images) - int(vq_cfg.data.num_eval)
            _, metrics = train_vq(images, vq_cfg, out, progress=progress)
            ev = metrics.get("eval", {})
            return {"psnr": ev.get("psnr"), "usage": ev.get("usage"), "images": int(len(images)),
                    "train_time_s": metrics.get("train_time_s")}

        vq_dir, _ = cached_stage("vq", vq_fp, cache, build_vq, log, say)

    # pre-tokenisation of both splits: user images through the understanding tower, assistant images
    # through the generation tower (one encoder when both are the VQ)
    tower_fp = None
    if tower is not None:
        tp = os.path.abspath(str(tower.path))
        stamp = _file_stamp(sorted(glob.glob(os.path.join(tp, "*"))) if os.path.isdir(tp) else [tp])
        tower_fp = [tower_name, stamp, int(tower.get("select_layer", -2)), bool(tower.get("feature_post_norm", False))]
    feature_dtype = str((sc.get("features") or {}).get("dtype", "float16"))
    ds_fp = fingerprint("dataset-imported", tr_fp, te_fp, vq_fp, size, str(src.resize), str(src.on_error),
                        int(sc.data.records_per_shard), kinds if tower is not None else None, tower_fp,
                        feature_dtype if tower is not None else None)

    def encoders():
        made = {}
        if uses_codes:
            made["codes"] = pt.vq_encoder(vq_dir, size, vq_resize)
        if tower is not None:
            made["features"] = pt.tower_encoder(str(tower.path), kind=tower_name, resize=str(src.resize),
                                                select_layer=int(tower.get("select_layer", -2)),
                                                feature_post_norm=bool(tower.get("feature_post_norm", False)))
        return {role: made[k] for role, k in kinds.items()}

    def build_ds(out: str) -> dict:
        enc = encoders()
        info = {}
        for split, d in (("train", tr_dir), ("test", te_dir)):
            if d is None:
                continue
            shards = _shards(d)
            if not shards:
                continue
            from uvjax.data.storage import RecordReader
            bar = _bar(f"pretokenise {split}", len(RecordReader(shards))) if progress else None
            rep = pt.pretokenise_shards(shards, enc, os.path.join(out, split), split=split,
                                        chunk=int(sc.data.records_per_shard), batch=int(sc.data.encode_batch),
                                        on_error=str(src.on_error), feature_dtype=feature_dtype,
                                        progress=bar.update if bar else None)
            if bar:
                bar.close()
            info[split] = rep
        tokens = {}
        for role, e in enc.items():
            if e.kind == "codes":
                h, w = e.tower.cfg.grid(e.image_size)
                tokens[role] = int(h * w)
                info.update(codebook_size=int(e.tower.cfg.codebook_size), code_dim=int(e.tower.cfg.code_dim))
            else:
                tokens[role] = int(e.tower.cfg.feature_tokens)
                info["feature_dim"] = int(e.tower.cfg.width)
        info["image_tokens_by_role"] = tokens
        return info

    ds_dir, ds_info = cached_stage("dataset", ds_fp, cache, build_ds, log, say)
    if say:
        for split in ("train", "test"):
            if split in ds_info:
                say(pt.format_report(ds_info[split]))

    # the config, pointed at the stages' outputs
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.data.tokenizer = tok_dir
        for stream in ("understanding", "generation", "interleaved"):
            have = _shards(os.path.join(ds_dir, "train"), f"train-{stream}")
            cfg.data.streams[stream].paths = tuple(have)
            if not have:
                cfg.data.streams[stream].weight = 0.0
        if not any(cfg.data.streams[s].paths for s in cfg.data.streams):
            raise ValueError(f"no pre-tokenised training records in {ds_dir}/train; see the skip report above")
        n = set(ds_info["image_tokens_by_role"].values())
        cfg.data.image_tokens = n.pop() if len(n) == 1 else 0  # mixed counts (e.g. 576 CLIP vs 256 VQ)
        if "feature_dim" in ds_info and int(cfg.model.image.feature_dim) != int(ds_info["feature_dim"]):
            raise ValueError(f"model.image.feature_dim={cfg.model.image.feature_dim} must equal the {tower_name} "
                             f"tower's width {ds_info['feature_dim']} ({tower.path})")
        if not uses_codes:
            pass
        elif cfg.model.image.num_codes != ds_info["codebook_size"] or cfg.model.image.code_dim != ds_info["code_dim"]:
            raise ValueError(f"model.image.num_codes/code_dim ({cfg.model.image.num_codes}/{cfg.model.image.code_dim}) "
                             f"must match the VQ tokenizer ({ds_info['codebook_size']}/{ds_info['code_dim']}) "
                             f"in {vq_dir}")
        else:
            cfg.model.image.codebook_from = vq_dir
        if cfg.model.vocab_size < tok_info["vocab_size"]:
            raise ValueError(f"model.vocab_size={cfg.model.vocab_size} < tokenizer vocab {tok_info['vocab_size']}")
    test_split = os.path.join(ds_dir, "test") if te_dir is not None and os.path.isdir(os.path.join(ds_dir, "test")) else None
    lengths = length_report(cfg, ds_dir, tok_dir, cache, log)
    if say:
        say(format_length_report(lengths, int(cfg.train.seq_len)))
    return cfg, {"tokenizer": tok_dir, "vq": vq_dir, "dataset": ds_dir, "test_split": test_split,
                 "import_train": tr_dir, "import_test": te_dir, "lengths": lengths}


# ------------------------------------------------------------------------------------------ lengths
def record_lengths(records, tokenizer, template, seq_len: int, feature_dim: int = 0) -> dict:
    """Per stream: how many records ``seq_len`` leaves whole, truncates (text cut), strips of an image
    target (an assistant image cut off) or drops (no target left)."""
    from uvjax.data import sequence as sq
    from uvjax.data.formats import stream_for
    cfg = sq.SequenceConfig(seq_len=10 ** 9, check_tasks=False, feature_dim=feature_dim)
    out: dict = {}
    for rec in records:
        enc = sq.encode_record(rec, tokenizer, template, cfg, pad=False)
        a = enc.arrays
        n = int(enc.length)
        it = np.flatnonzero(a["image_target"])
        tt = np.flatnonzero(a["text_target"])
        s = out.setdefault(stream_for(rec), {"records": 0, "ok": 0, "truncated": 0, "image_target_lost": 0,
                                             "dropped": 0, "max_length": 0})
        s["records"] += 1
        s["max_length"] = max(s["max_length"], n)
        if n <= seq_len:
            s["ok"] += 1
            continue
        first_target = min([int(x[0]) for x in (it, tt) if x.size] or [n])
        if first_target >= seq_len:
            s["dropped"] += 1
        elif it.size and int(it[-1]) >= seq_len - 1:  # an image cut moves before its <boi>: its codes are lost
            s["image_target_lost"] += 1
        else:
            s["truncated"] += 1
    return out


def length_report(cfg, ds_dir: str, tok_dir: str, cache: str, log) -> dict:
    from uvjax.data.storage import RecordReader
    from uvjax.data.tokenizer import TextTokenizer, get_template
    from uvjax.stages import cached_stage, fingerprint
    seq_len = int(cfg.train.seq_len)
    im = cfg.model.image
    fdim = int(im.feature_dim) if "features" in (im.input_kind, im.output_kind) else 0
    fp = fingerprint("lengths", ds_dir, tok_dir, str(cfg.data.template), cfg.data.get("system_prompt"), seq_len)

    def build(out: str) -> dict:
        tok = TextTokenizer.load(tok_dir)
        template = get_template(cfg.data.template, cfg.data.get("system_prompt"))
        res = {"seq_len": seq_len}
        for split in ("train", "test"):
            shards = _shards(os.path.join(ds_dir, split))
            if shards:
                res[split] = record_lengths(RecordReader(shards), tok, template, seq_len, fdim)
        return res

    _, info = cached_stage("lengths", fp, cache, build, log, None)
    return info


def format_length_report(rep: dict, seq_len: int) -> str:
    lines, bad = [], False
    for split in ("train", "test"):
        for stream, s in sorted((rep.get(split) or {}).items()):
            lost = s["truncated"] + s["image_target_lost"] + s["dropped"]
            bad |= lost > 0
            lines.append(f"  {split}/{stream}: {s['records']} records, longest {s['max_length']} tokens; at "
                         f"seq_len={seq_len}: {s['ok']} whole, {s['truncated']} text cut, {s['image_target_lost']} "
                         f"lose an image target, {s['dropped']} dropped (no target left)")
    head = (f"WARNING: train.seq_len={seq_len} cuts records (counted below); raise --config.train.seq_len to keep them"
            if bad else f"sequence lengths: every record fits train.seq_len={seq_len}")
    return "\n".join([head] + lines)
