"""The TPU pod launcher's dry run prints exactly the gcloud commands a user would run."""
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "tpu_pod.sh")


def _dry(*args, env=None):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("GCP_", "TPU_", "UVJAX_TPU"))}
    e.update(env or {})
    p = subprocess.run(["bash", SCRIPT, "--dry-run", *args], capture_output=True, text=True, env=e, timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().splitlines()


def test_create_and_delete():
    out = _dry("--name", "pod1", "--project", "proj", "--zone", "us-central2-b", "--accelerator", "v4-32",
               "--runtime", "tpu-ubuntu2204-base", "create")
    assert out == ["gcloud compute tpus tpu-vm create pod1 --zone=us-central2-b --project=proj "
                   "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base"]
    out = _dry("--name", "pod1", "--zone", "z", "--queued", "delete")
    assert out == ["gcloud compute tpus queued-resources delete pod1 --zone=z --force --quiet"]


def test_settings_from_environment_and_queued_create():
    out = _dry("--queued", "create", env={"UVJAX_TPU_NAME": "envpod", "GCP_ZONE": "europe-west4-a",
                                           "TPU_ACCELERATOR": "v5litepod-16", "TPU_RUNTIME": "v2-alpha-tpuv5-lite"})
    assert out == ["gcloud compute tpus queued-resources create envpod --node-id=envpod --zone=europe-west4-a "
                   "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite"]


def test_run_uses_every_worker_and_streams_worker_zero():
    out = _dry("--name", "p", "--zone", "z", "run", "--", "python", "-m", "uvjax.train",
               "--config=configs/vqvq.py:tiny", "--workdir=gs://b/r")
    assert len(out) == 2
    assert out[0].startswith("gcloud compute tpus tpu-vm ssh p --zone=z --worker=all --command=")
    assert "python -m uvjax.train --config=configs/vqvq.py:tiny --workdir=gs://b/r" in out[0].replace("\\", "")
    assert out[1].startswith("gcloud compute tpus tpu-vm ssh p --zone=z --worker=0 --command=")
    assert "tail" in out[1]


def test_setup_copies_and_installs_on_all_workers():
    out = _dry("--name", "p", "--zone", "z", "setup")
    assert out[0].startswith("tar -C ")
    assert out[1].startswith("gcloud compute tpus tpu-vm scp /tmp/uvjax-src.tar.gz p:/tmp/uvjax-src.tar.gz")
    assert "--worker=all" in out[1] and "--worker=all" in out[2] and "pip install -e '.[gcs]'" in out[2].replace("\\", "")


def test_stop_sends_sigterm_everywhere_and_unknown_command_fails():
    out = _dry("--name", "p", "--zone", "z", "stop")
    assert "--worker=all" in out[0] and "pkill" in out[0] and "TERM" in out[0]
    p = subprocess.run(["bash", SCRIPT, "--dry-run", "frobnicate"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "unknown command" in p.stderr
