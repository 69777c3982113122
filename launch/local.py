"""Start N processes of one command on this machine, as a pod would run them on N hosts.

    python launch/local.py --num_processes=2 --cpu_devices=2 -- \\
        python -m uvjax.train --config=configs/vqvq.py:smoke --workdir=runs/mp

Each process gets ``--coordinator=127.0.0.1:PORT --num_processes=N --process_id=i --cpu_devices=K``
appended (JAX's multi-controller runtime on the CPU with gloo collectives). Output lines are prefixed
with the process index; if one process fails the others are stopped, and the exit code is the first
non-zero one. Used by the multi-process tests.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(stream, prefix, sink):
    for line in iter(stream.readline, ""):
        sink.write(f"[{prefix}] {line}")
        sink.flush()


def launch(command: list[str], num_processes: int, cpu_devices: int | None = None, port: int | None = None,
           env: dict | None = None, timeout: float | None = None) -> int:
    port = port or free_port()
    procs = []
    env = dict(os.environ if env is None else env)
    env.pop("XLA_FLAGS", None)  # device count comes from --cpu_devices, not a global flag
    for i in range(num_processes):
        cmd = [*command, f"--coordinator=127.0.0.1:{port}", f"--num_processes={num_processes}", f"--process_id={i}"]
        if cpu_devices:
            cmd.append(f"--cpu_devices={cpu_devices}")
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=_pump, args=(p.stdout, i, sys.stdout), daemon=True).start()
        procs.append(p)
    code = 0
    try:
        for p in procs:
            rc = p.wait(timeout=timeout)
            if rc and not code:
                code = rc
                for q in procs:
                    if q.poll() is None:
                        q.send_signal(signal.SIGTERM)
    except subprocess.TimeoutExpired:
        code = 124
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return code


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num_processes", type=int, required=True)
    ap.add_argument("--cpu_devices", type=int, default=None)
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.command[1:] if a.command and a.command[0] == "--" else a.command
    if not cmd:
        ap.error("give the command after --")
    sys.exit(launch(cmd, a.num_processes, a.cpu_devices, a.port))


if __name__ == "__main__":
    main()
