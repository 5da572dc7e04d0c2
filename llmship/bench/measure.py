"""Run a step as a child process and record its wall time and peak RSS, so a converter's memory is
measured on its own. Peak RSS is the largest VmHWM among the child and its descendants, sampled while it
runs: wait4's ru_maxrss would start from this (parent) process's own peak, which Linux carries across
fork + exec.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Measured:
    returncode: int
    wall_s: float
    peak_rss_mb: float
    stdout: str
    stderr: str

    def error_line(self) -> str:
        lines = [ln for ln in self.stderr.strip().splitlines() if ln.strip()]
        return lines[-1][:300] if lines else f"exit code {self.returncode}"


def tree_peak_kb(pid: int) -> int:
    """The largest VmHWM (kB) among `pid` and its descendants; 0 where /proc cannot tell."""
    best, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                best = max([best] + [int(line.split()[1]) for line in f if line.startswith("VmHWM:")])
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return best


def run_measured(cmd: list[str], env: dict | None = None, timeout: float | None = None, cwd=None) -> Measured:
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=cwd, start_new_session=True)
        timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL)) if timeout else None
        if timer:
            timer.start()
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.1):
                peak[0] = max(peak[0], tree_peak_kb(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
        if timer:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Measured(proc.returncode, wall, (peak[0] or usage.ru_maxrss) / 1024, out.read(), err.read())


def measure_payload(ctx, **extra) -> dict:
    """What every anchor's measuring child needs from the bench context."""
    return {"prompt": ctx.prompt_tokens, "eval": ctx.eval_tokens, "steps": ctx.decode_steps, "threads": ctx.threads,
            "reference": str(ctx.reference_logits), **extra}


def measured_row(module: str, base: dict, payload: dict) -> dict:
    """Run `python -m module measure PAYLOAD` in a child and merge the JSON it prints (its last line) into `base`."""
    res = run_measured([sys.executable, "-m", module, "measure", json.dumps(payload)])
    if res.returncode != 0:
        return {**base, "error": f"measure: {res.error_line()}"}
    return {**base, **json.loads(res.stdout.strip().splitlines()[-1])}


def parity_vs_reference(logits, eval_tokens: list[int], reference_logits) -> dict:
    """KL mean and top-1 agreement of an anchor's teacher-forced logits against our reference (.npy path)."""
    import numpy as np

    from llmship.validation.evaluate import next_tokens, parity_metrics

    ref = np.load(reference_logits)
    n = min(len(ref), len(logits))
    metrics, _ = parity_metrics(np.asarray(logits[:n], dtype=np.float32), ref[:n], next_tokens(eval_tokens[:n]))
    return {"kl_mean": metrics["kl_mean"], "top1_agreement": metrics["top1_agreement"]}


def timing_and_parity(args: dict, load_s: float, ttft_s: float, decode_s: float, decode_steps: int, logits) -> dict:
    """The measured fields of a row: load, time to first token, prefill/decode rates, parity vs the reference."""
    return {"load_s": load_s, "ttft_ms": 1000 * ttft_s, "prefill_tok_s": len(args["prompt"]) / ttft_s,
            "decode_tok_s": decode_steps / decode_s, **parity_vs_reference(logits, args["eval"], args["reference"])}


def child_main(module_globals: dict) -> None:
    """`python -m <anchor> COMMAND PAYLOAD`: call the anchor's function named COMMAND (`measure` prints its JSON)."""
    command, payload = sys.argv[1], json.loads(sys.argv[2])
    result = module_globals[f"_{command}"](payload)
    if result is not None:
        print(json.dumps(result))


def cold_child_row(args: list[str], **fields) -> dict:
    """`python -m ARGS...` in a child with a fresh, empty llmship cache (the cost of computing, not of reading it back):
    `fields`, its wall time, peak RSS and error, and the JSON object its stdout's last line holds."""
    with tempfile.TemporaryDirectory() as cache:
        res = run_measured([sys.executable, "-m", *args], env={**os.environ, "LLMSHIP_CACHE": cache})
    row = {**fields, "wall_s": res.wall_s, "peak_rss_mb": res.peak_rss_mb,
           "error": None if res.returncode == 0 else res.error_line()}
    if res.returncode == 0:
        row.update(json.loads(res.stdout.strip().splitlines()[-1]))
    return row
