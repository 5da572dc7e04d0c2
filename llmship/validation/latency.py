"""Latency and memory, measured in a child process that holds only the runtime.

`python -m llmship.validation.latency ARTIFACT_DIR --threads N --decode-steps K` prints one JSON object:
load time, time to first token at each prefill length, prefill and decode tokens/s, per-token decode
p50/p90 after warm-up, and the process's peak RSS (so a converter's or the reference's memory never counts).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WARMUP_STEPS = 3


def measure_latency(artifact_dir: Path, threads: int, decode_steps: int) -> dict:
    from llmship.manifest import read_manifest
    from llmship.validation.runners import open_runner

    manifest = read_manifest(artifact_dir)
    t0 = time.perf_counter()
    runner = open_runner(artifact_dir, manifest, threads)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    vocab = manifest["model"]["vocab_size"]
    ttft = {}
    for length in manifest["prefill_lengths"]:
        tokens = rng.integers(3, vocab, size=length).tolist()
        times = []
        for _ in range(3):
            runner.reset()
            t0 = time.perf_counter()
            int(np.argmax(runner.prefill(tokens, 0)[-1]))
            times.append(time.perf_counter() - t0)
        ttft[str(length)] = 1000 * float(np.median(times))
    longest = max(manifest["prefill_lengths"])
    # decode after the longest prompt, or from an earlier position when the cache has no room left after it
    start = longest if manifest["max_context"] - longest > WARMUP_STEPS else 0
    steps = max(1, min(decode_steps, manifest["max_context"] - start - WARMUP_STEPS))
    token, pos, step_ms = int(rng.integers(3, vocab)), start, []
    for i in range(WARMUP_STEPS + steps):
        t0 = time.perf_counter()
        token = int(np.argmax(runner.decode(token, pos)))
        if i >= WARMUP_STEPS:
            step_ms.append(1000 * (time.perf_counter() - t0))
        pos += 1
    runner.close()
    return {
        "threads": threads,
        "load_s": load_s,
        "ttft_ms": ttft[str(longest)],
        "ttft_ms_by_prefill_length": ttft,
        "prefill_tok_s": longest / (ttft[str(longest)] / 1000),
        "decode_tok_s": 1000 * len(step_ms) / sum(step_ms),
        "decode_ms_p50": float(np.percentile(step_ms, 50)),
        "decode_ms_p90": float(np.percentile(step_ms, 90)),
        "decode_steps": len(step_ms),
        "executor": getattr(runner, "executor", ""),
        "peak_rss_mb": peak_rss_mb(),
    }


def peak_rss_mb() -> float:
    """This process's own peak resident memory. Linux: VmHWM, the high-water mark of this process's address
    space, which starts empty at exec. Not ru_maxrss: Linux carries the parent's high-water mark across
    fork + exec into it, so a child of a process holding the model would report the model's memory."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB on Linux


def run_in_child(artifact_dir: Path, threads: int, decode_steps: int) -> dict:
    """Run `measure_latency` in a fresh interpreter; errors come back as the child's last stderr line."""
    from llmship.errors import error_for_exit_code

    cmd = [sys.executable, "-m", "llmship.validation.latency", str(artifact_dir), "--threads", str(threads),
           "--decode-steps", str(decode_steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise error_for_exit_code(proc.returncode, f"latency measurement of {artifact_dir} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("artifact")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode-steps", type=int, default=16)
    args = p.parse_args(argv)
    from llmship.errors import LlmshipError

    try:
        print(json.dumps(measure_latency(Path(args.artifact), args.threads, args.decode_steps)))
    except LlmshipError as exc:
        print(f"{exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
