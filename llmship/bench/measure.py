"""Run a step as a child process and record its wall time and peak RSS (the kernel's accounting for that
child, from wait4), so a converter's memory is measured on its own."""
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


def run_measured(cmd: list[str], env: dict | None = None, timeout: float | None = None, cwd=None) -> Measured:
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=cwd, start_new_session=True)
        timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL)) if timeout else None
        if timer:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if timer:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Measured(proc.returncode, wall, usage.ru_maxrss / 1024, out.read(), err.read())


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


def timing_and_parity(args: dict, load_s: float, ttft_s: float, decode_s: float, decode_steps: int, logits) -> dict:
    """The measured fields of a row: load, time to first token, prefill/decode rates, parity vs the reference."""
    from llmship.bench import parity_vs_reference

    return {"load_s": load_s, "ttft_ms": 1000 * ttft_s, "prefill_tok_s": len(args["prompt"]) / ttft_s,
            "decode_tok_s": decode_steps / decode_s, **parity_vs_reference(logits, args["eval"], args["reference"])}


def child_main(module_globals: dict) -> None:
    """`python -m <anchor> COMMAND PAYLOAD`: call the anchor's function named COMMAND (`measure` prints its JSON)."""
    command, payload = sys.argv[1], json.loads(sys.argv[2])
    result = module_globals[f"_{command}"](payload)
    if result is not None:
        print(json.dumps(result))
