"""benchmarks/pretokenise.py --quick (the tiny VQ only): writes its JSON with the machine, the pass's
encoder and whole-pass rates and the pipeline's rate on the pre-tokenised shards (timings not asserted
beyond being positive)."""
from __future__ import annotations

import json


def test_pretokenise_benchmark_quick(tmp_path, capsys):
    from benchmarks import pretokenise as bench
    from benchmarks.common import CPU_FLAGS
    out = tmp_path / "pretokenise.json"
    bench.main(["--quick", "--batches=4", f"--out={out}"])
    res = json.loads(out.read_text())
    assert {"machine", "idle", "config", "setup", "pretokenise", "pipeline"} <= set(res)
    m = res["machine"]
    assert m["cpu_model"] and m["cores"] >= 1 and set(CPU_FLAGS) == set(m["flags"]) and m["cpu_family"]
    assert res["config"]["archs"] == ["tiny"] and set(res["pretokenise"]) == set(res["pipeline"]) == {"tiny"}
    s = res["setup"]["tiny"]
    assert (s["image_size"], s["grid"], s["codes_per_image"], s["images"], s["records"]) == (64, "8x8", 64, 16, 49)
    p = res["pretokenise"]["tiny"]["median"]
    for k in ("encoder_images_per_s", "pass_images_per_s", "pass_records_per_s"):
        assert p[k] > 0, k
    # each image is shared by 3 records and encoded once; the whole pass is slower than its encoder calls
    assert p["images_encoded"] == 16 and p["image_refs"] == 48 and p["records"] == 49
    assert p["pass_images_per_s"] <= p["encoder_images_per_s"] * 1.01
    d = res["pipeline"]["tiny"]["median"]
    assert d["examples_per_s"] > 0 and d["tokens_per_s"] > 0 and 0 < d["fill"] <= 1
    table = capsys.readouterr().out
    assert "enc img/s" in table and "examples/s" in table and m["cpu_model"] in table
