"""The one stage graph before the LM (:func:`prepare`): source -> tokenizer -> towers -> dataset."""
from __future__ import annotations

import logging
import os

import ml_collections as mlc

from uvjax import pretokenise as pt
from uvjax import storage_paths as sp
from uvjax.config import features_config
from uvjax.data.tokenizer import TextTokenizer, template_texts, train_bpe
from uvjax.models.unified import uses_codes as model_uses_codes
from uvjax.models.unified import uses_features as model_uses_features
from uvjax.stage_log import StageLog, _jsonable, fingerprint
from uvjax.stages import imported as si
from uvjax.stages.cache import cached_stage, stage_cache_dir
from uvjax.stages.features import build_feature_dataset, build_siglip
from uvjax.stages.smartwatch import SmartWatchSource, _bar, build_dataset, build_reasoning, build_vq
from uvjax.stages.specs import reasoning_enabled
from uvjax.towers import encoders as tower_encoders
from uvjax.training.vq_train import train_vq
from uvjax.weights.pretrained import pretrained_spec, save_base_tokenizer

_log = logging.getLogger(__name__)

def check_no_user_streams(cfg) -> None:
    """The stages point ``data.streams.*.paths`` at their own shards; a config that set them itself would
    have its data replaced without a word, so it is refused instead."""
    given = {s: tuple(cfg.data.streams[s].paths) for s in cfg.data.streams if tuple(cfg.data.streams[s].paths)}
    if given:
        raise ValueError(
            f"data.streams paths are set ({given}) while stages.build=True, which would replace them with the "
            "stages' shards. To train on your own data either let the stages import and pre-tokenise it "
            "(--config.stages.source.kind=imported --config.stages.source.train=DATA.json "
            "--config.stages.source.image_dir=IMAGES; docs/USAGE.md 'Train on your own data'), or train on shards you "
            "pre-tokenised yourself with --config.stages.build=False")



def prepare(cfg, workdir: str, *, progress: bool = True) -> tuple[mlc.ConfigDict, dict]:
    """The one stage graph before the LM; returns the config pointed at its outputs and the stage paths.

        source   the Smart Watch renderer (+ reasoning generator), or imported data (import-train/-test)
        tokenizer  BPE trained on the source's texts, or the base model's
        towers   vq: given (stages.source.vq) or trained on the source's images; SigLIP/CLIP: given
                 (towers.siglip/clip.path) or, for the Smart Watch source, pretrained by uvjax (stages.siglip)
        dataset  pre-tokenised shards: user images through the understanding tower, assistant images
                 through the generation tower, each distinct image once (+ reasoning shards)
        lengths  (imported) how many records train.seq_len cuts, printed at every start
    """
    check_no_user_streams(cfg)
    sc = cfg.stages
    cache = stage_cache_dir(sc, workdir)
    log = StageLog(workdir)
    say = (lambda m: print(f"[stage] {m}", flush=True)) if progress else None
    im = cfg.model.image
    kinds = {"user": str(im.input_kind), "assistant": str(im.output_kind)}
    uses_codes, uses_features = model_uses_codes(im), model_uses_features(im)
    size = int(sc.data.image_size)
    src_cfg = sc.get("source") or si.source_config()
    towers_vq = ((cfg.get("towers") or {}).get("vq") or {}).get("path", "")  # clipvq's name for it
    given_vq_path = str(src_cfg.get("vq", "") or towers_vq or "")
    tower_name, tower = si.given_tower(cfg) if uses_features else (None, None)

    # checks before any work
    imported = si.is_imported(sc)
    if reasoning_enabled(sc) and (imported or kinds != {"user": "codes", "assistant": "codes"}):
        raise ValueError("stages.reasoning.num_scenes > 0 is supported for VQ-VQ on the Smart Watch source only "
                         "(the reasoning records are pre-tokenised with the VQ tokenizer)")
    if uses_features and tower is None and (imported or "siglip" not in sc):
        raise ValueError("this architecture reads or writes SigLIP/CLIP features" + (
            ", and imported images need a pretrained tower" if imported else "") + ": set "
            "--config.towers.siglip.path= (or towers.clip.path=) to an HF SiglipVisionModel/CLIPVisionModel "
            "directory or a uvjax tower file (siglip.safetensors)" + (
            "" if imported else ", or config.stages.siglip to pretrain one (configs/siglip_pretrain.py)"))
    if uses_codes and not given_vq_path and (int(im.num_codes) != int(sc.vq.model.codebook_size)
                                             or int(im.code_dim) != int(sc.vq.model.code_dim)):
        raise ValueError(f"model.image.num_codes/code_dim ({im.num_codes}/{im.code_dim}) must match the VQ tokenizer "
                         f"the stages train ({sc.vq.model.codebook_size}/{sc.vq.model.code_dim}): set "
                         "stages.vq.model.codebook_size/code_dim or the model's, or stages.source.vq to a converted "
                         "VQ tokenizer (e.g. LlamaGen VQ-16 for 16384 codes)")

    # 1. source
    source = si.ImportedSource(sc, cache, log, say) if imported else SmartWatchSource(sc)

    # 2. text tokenizer
    base = pretrained_spec(cfg)
    tok_fp = source.tokenizer_fp(cfg, _jsonable(cfg.model.get("pretrained")) if base else None)

    def build_tok(out: str) -> dict:
        if base:
            return save_base_tokenizer(cfg, out)
        if not imported:
            return source.build_tokenizer(cfg, out)
        tok = train_bpe(source.texts() + template_texts(), vocab_size=int(sc.tokenizer.vocab_size))
        tok.save(out)
        return {"vocab_size": tok.vocab_size, "template": str(cfg.data.template)}

    if str(cfg.data.get("tokenizer", "") or ""):  # the user's tokenizer directory, used as given
        tok_dir = sp.local_tree(str(cfg.data.tokenizer), sp.remote_cache_dir("trees"))  # gs://: a local mirror
        if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
            raise FileNotFoundError(f"data.tokenizer={cfg.data.tokenizer!r}: no tokenizer.json there")
        tok_info = {"vocab_size": TextTokenizer.load(tok_dir).vocab_size}
        log.write(stage="tokenizer", fingerprint=fingerprint("tokenizer-given", tok_dir), reused=True, seconds=0.0,
                  path=tok_dir)
        tok_stage = None  # the user's: not a stage
    else:  # an imported source's BPE reads the import-train stage's texts
        tok_dir, tok_info = cached_stage("tokenizer", tok_fp, cache, build_tok, log, say,
                                         inputs=source.stage_dirs("train") if imported and not base else None)
        tok_stage = tok_dir

    # 3. towers
    vq_dir = vq_fp = None
    vq_info: dict = {}
    if uses_codes and given_vq_path:
        vq_dir, vq_fp = si.given_vq(given_vq_path, log)
    elif uses_codes:
        vq_fp = source.vq_fp()

        def build_vq_stage(out: str) -> dict:
            if not imported:
                return build_vq(sc, out)
            vq_cfg = sc.vq.copy_and_resolve_references()
            with vq_cfg.unlocked():
                vq_cfg.data.image_size = size
            images, vq_cfg = source.vq_images(vq_cfg)
            _, metrics = train_vq(images, vq_cfg, out, progress=progress)
            ev = metrics.get("eval", {})
            return {"psnr": ev.get("psnr"), "usage": ev.get("usage"), "images": int(len(images)),
                    "train_time_s": metrics.get("train_time_s")}

        vq_dir, vq_info = cached_stage("vq", vq_fp, cache, build_vq_stage, log, say,
                                       inputs=source.stage_dirs("train") if imported else None)
    tower_dir = tower_fp = None
    tower_info: dict = {}
    if uses_features and tower is not None:
        tower_dir = os.path.abspath(os.path.expanduser(str(tower.path)))
        tower_fp = fingerprint("tower", si.given_tower_fp(tower_name, tower))
        log.write(stage="siglip", fingerprint=tower_fp, reused=True, seconds=0.0, path=tower_dir, tower=tower_name)
    elif uses_features:
        tower_name, tower_fp = "siglip", fingerprint("siglip", sc.siglip, size)
        tower_dir, tower_info = cached_stage("siglip", tower_fp, cache, lambda out: build_siglip(sc, out), log, say)

    # 4. pre-tokenised dataset
    feats_cfg = sc.get("features") or features_config()
    feature_dtype = str(feats_cfg.get("dtype", "float16")) if uses_features else None
    ds_fp = source.dataset_fp(kinds, vq_fp, tower_fp, feature_dtype)

    def encoders() -> dict:
        made = {}
        if uses_codes:
            made["codes"] = tower_encoders.vq_encoder(vq_dir, size, str(src_cfg.get("resize", "")) if imported else "")
        if uses_features:
            made["features"] = tower_encoders.tower_encoder(
                tower_dir, kind=tower_name, resize=str(src_cfg.get("resize", "")) if imported else "",
                **({} if tower is None else dict(select_layer=int(tower.get("select_layer", -2)),
                                                 feature_post_norm=bool(tower.get("feature_post_norm", False)))))
        return {role: made[k] for role, k in kinds.items()}

    def build_ds(out: str) -> dict:
        if not imported and not uses_features:
            return build_dataset(sc, vq_dir, out, _bar if progress else None)
        enc = encoders()
        if imported:
            info = source.pretokenise(enc, out, feature_dtype or "float16", _bar if progress else None)
        else:
            sc_run = sc.copy_and_resolve_references()
            with sc_run.unlocked():
                sc_run.features = feats_cfg
            info = build_feature_dataset(sc_run, kinds, enc, out, _bar if progress else None)
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

    # the input stages the dataset is made from (a VQ file or tower the user gave is not a stage: left out,
    # its fingerprint holds its size and mtime)
    ds_inputs = {"vq": vq_dir if uses_codes and not given_vq_path else None,
                 "siglip": tower_dir if uses_features and tower is None else None,
                 **(source.stage_dirs("train", "test") if imported else {})}
    ds_dir, ds_info = cached_stage("dataset", ds_fp, cache, build_ds, log, say, inputs=ds_inputs)
    if say and imported:
        for split in ("train", "test"):
            if split in ds_info:
                say(pt.format_report(ds_info[split]))
    rs_dir = None
    if reasoning_enabled(sc):
        rs_fp = fingerprint("reasoning", sc.reasoning, int(sc.data.seed), size, vq_fp)
        rs_dir, _ = cached_stage("reasoning", rs_fp, cache, lambda out: build_reasoning(sc, vq_dir, out), log, say,
                                 inputs={"vq": None if given_vq_path else vq_dir})

    # 5. the config, pointed at the stages' outputs
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.data.tokenizer = tok_dir
        for stream, paths in source.train_paths(ds_dir).items():
            cfg.data.streams[stream].paths = paths
            if not paths:
                cfg.data.streams[stream].weight = 0.0
            elif imported and float(cfg.data.streams[stream].weight) <= 0 and say:
                n = (ds_info.get("train") or {}).get("records_written", {}).get(stream, "?")
                say(f"WARNING: {n} imported {stream} records are not trained on: data.streams.{stream}.weight is "
                    f"{cfg.data.streams[stream].weight} (set --config.data.streams.{stream}.weight=1 to use them)")
        if rs_dir is not None:
            cfg.data.streams.interleaved.paths = (os.path.join(rs_dir, "train", "train-interleaved-*.array_record"),)
        if not any(cfg.data.streams[s].paths for s in cfg.data.streams):
            raise ValueError(f"no pre-tokenised training records in {ds_dir}/train; see the skip report above")
        if "image_tokens_by_role" in ds_info:
            n = set(ds_info["image_tokens_by_role"].values())
            cfg.data.image_tokens = n.pop() if len(n) == 1 else 0  # mixed counts (e.g. 576 CLIP vs 256 VQ)
        else:
            cfg.data.image_tokens = int(ds_info["image_tokens"])
        if uses_features and int(im.feature_dim) != int(ds_info["feature_dim"]):
            raise ValueError(f"model.image.feature_dim={im.feature_dim} must equal the {tower_name} tower's width "
                             f"{ds_info['feature_dim']} ({tower_dir}; stages.siglip.vit.width when uvjax pretrains it)")
        if uses_codes:
            if im.num_codes != ds_info["codebook_size"] or im.code_dim != ds_info["code_dim"]:
                raise ValueError(f"model.image.num_codes/code_dim ({im.num_codes}/{im.code_dim}) must match the VQ "
                                 f"tokenizer ({ds_info['codebook_size']}/{ds_info['code_dim']}) in {vq_dir}")
            cfg.model.image.codebook_from = vq_dir  # fresh runs start their code vectors from the VQ's
        if cfg.model.vocab_size < tok_info["vocab_size"]:
            raise ValueError(f"model.vocab_size={cfg.model.vocab_size} < tokenizer vocab {tok_info['vocab_size']}")
    paths = {"tokenizer": tok_dir, "vq": vq_dir, "dataset": ds_dir, "vq_metrics": vq_info,
             "test_split": source.test_split(ds_dir), "reasoning": rs_dir}
    if uses_features:
        paths.update(siglip=tower_dir, siglip_metrics=tower_info)
    if imported:
        paths.update(import_train=source.train_dir, import_test=source.test_dir)
        lengths = si.length_report(cfg, ds_dir, tok_dir, cache, log, inputs={"dataset": ds_dir, "tokenizer": tok_stage})
        paths["lengths"] = lengths
        if say:
            say(si.format_length_report(lengths, int(cfg.train.seq_len)))
    return cfg, paths
