"""The stage graph before the LM: source → tokenizer → towers → pre-tokenised dataset (→ LM → evaluation).

One graph for every source and architecture (:func:`prepare`): the source is the Smart Watch renderer (the
first run; + the reasoning generator) or the user's imported data (``stages.source``, uvjax/stages/imported.py);
the towers are the VQ tokenizer and/or a SigLIP/CLIP tower, trained by uvjax or given as files; user images go
through the understanding tower and assistant images through the generation tower (uvjax/stages/features.py
has the SigLIP pieces).

Each stage's output lives in ``<cache_dir>/<stage>-<fingerprint>/`` where the fingerprint hashes the
config that produced it and the fingerprints of its inputs. A finished stage writes ``DONE.json``
last (after its files are complete), so a killed stage is rebuilt and a finished one is reused by the
next run — and by other configs that share it (e.g. vqvq and siglipvq share the dataset and the text
tokenizer). Every decision is appended to ``<workdir>/stages.jsonl`` (stage, fingerprint, reused or
built, seconds), which is also how tests check what was rebuilt. SIGTERM/SIGINT stop a stage at its next
safe point (``uvjax.interrupt``: between chunks or training steps); the rerun resumes.

The pre-tokenisation pass renders the Smart Watch records image by image, runs the frozen VQ encoder
over them in batches and stores codes in the records (ArrayRecord), so the train step never runs a
frozen tower. It is resumable by chunk: finished chunks have their own marker and are skipped.
"""

# Modules: cache.py (fingerprints, the stage log, cached_stage), smartwatch.py (the renderer's stages),
# features.py (SigLIP/CLIP towers and feature datasets), imported.py (the user's data), prepare.py (the graph).
