"""The evaluation's statistics: intervals that cover, tie-robust top-1, gates that know their noise."""
from __future__ import annotations

import numpy as np

from llmship.config import Gates
from llmship.validation.evaluate import next_tokens, parity_metrics
from llmship.validation.gates import check_gates, kl_regression
from llmship.validation.statistics import mean_interval, paired_difference


def test_the_95_percent_interval_of_mean_kl_covers_the_true_mean_about_95_percent_of_the_time():
    """Per-token KL is skewed (most tokens near zero, a tail of large ones): a gamma(0.5) with mean 0.05."""
    true_mean, hits = 0.05, 0
    for trial in range(400):
        kl = np.random.default_rng(trial).gamma(0.5, 0.1, size=1024)
        lo, hi = mean_interval(kl, seed=trial)
        hits += lo <= true_mean <= hi
    assert 0.93 <= hits / 400 <= 0.97, hits / 400


def test_a_paired_difference_finds_a_small_real_change_that_unpaired_intervals_miss():
    rng = np.random.default_rng(0)
    old = rng.gamma(0.5, 0.1, size=1024)
    new = old * 1.05  # every token 5% worse
    diff, lo, hi = paired_difference(new, old)
    assert lo > 0 and abs(diff - 0.05 * old.mean()) < 1e-12
    a, b = mean_interval(new), mean_interval(old)
    assert a[0] < b[1]  # the two intervals overlap: unpaired, the change would not count as real


def planted_ties(n=256, vocab=40, seed=0):
    """Reference logits with a near-tie (top two within 1e-4) at every fourth position."""
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(n, vocab)).astype(np.float32) * 3
    top = ref.argmax(-1)
    for i in range(0, n, 4):
        second = (top[i] + 1) % vocab
        ref[i, second] = ref[i, top[i]] - 5e-5
    return ref


def test_near_ties_do_not_fail_an_fp16_exact_artifact_but_a_real_fault_still_does():
    ref = planted_ties()
    targets = next_tokens(list(np.random.default_rng(1).integers(0, 40, len(ref))))
    # fp16-exact: the reference's logits stored in fp16 (what an fp16 program returns), near-ties flip
    fp16 = ref.astype(np.float16).astype(np.float32) + np.random.default_rng(2).normal(scale=2e-3, size=ref.shape).astype(np.float32)
    faulty = ref + np.random.default_rng(3).normal(scale=1.5, size=ref.shape).astype(np.float32)
    gates = Gates(top1_agreement_min=0.99, top1_tie_margin=1e-2)
    exact, _ = parity_metrics(fp16, ref, targets, tie_margin=gates.top1_tie_margin)
    assert exact["top1_agreement"] < 0.99 and exact["ties_excluded"] >= len(ref) // 4  # raw top-1 would fail
    assert exact["top1_clear"] == 1.0
    assert all(g["passed"] for g in check_gates({"parity": exact}, gates))
    broken, _ = parity_metrics(faulty, ref, targets, tie_margin=gates.top1_tie_margin)
    assert not check_gates({"parity": broken}, gates)[0]["passed"] and broken["top1_clear"] < 0.9


def report_with(kl: np.ndarray, tokens_sha: str) -> dict:
    lo, hi = mean_interval(kl)
    return {"parity": {"kl_mean": float(kl.mean()), "intervals": {"kl_mean": [lo, hi]}},
            "series": {"kl_per_token": kl.tolist()}, "evaluation": {"tokens_sha256": tokens_sha}}


def test_the_kl_regression_gate_fails_only_on_a_real_and_large_worsening():
    kl = np.random.default_rng(0).gamma(0.5, 0.1, size=1024)
    same = kl_regression(report_with(kl, "a"), report_with(kl, "a"), 10.0)
    assert same["passed"] and same["method"] == "paired"
    worse = kl_regression(report_with(kl * 1.2, "a"), report_with(kl, "a"), 10.0)
    assert not worse["passed"]
    slightly = kl_regression(report_with(kl * 1.05, "a"), report_with(kl, "a"), 10.0)
    assert slightly["passed"]  # real but within the allowed 10%
    other_seed = np.random.default_rng(1).gamma(0.5, 0.1, size=1024)  # another evaluation: unpaired, noise only
    assert kl_regression(report_with(other_seed, "b"), report_with(kl, "a"), 10.0)["passed"]


def test_a_gate_whose_interval_straddles_its_limit_is_marginal():
    kl = np.random.default_rng(0).gamma(0.5, 0.1, size=1024)
    report = report_with(kl, "a")
    lo, hi = report["parity"]["intervals"]["kl_mean"]
    gate = check_gates(report, Gates(kl_mean_max=(lo + hi) / 2))[0]
    assert gate["marginal"] and gate["interval"] == [lo, hi]
    assert not check_gates(report, Gates(kl_mean_max=hi * 2))[0]["marginal"]


def test_a_version_1_report_still_renders():
    """Reports written before intervals, conversion and greedy text (report_version 1) render in all three forms."""
    from llmship.validation.report import checked, html_page, junit, markdown

    v1 = {"report_version": 1, "target": "onnx-int4", "source": "builtin:tiny", "executor": "onnxruntime 1.31.1",
          "artifact": {"bytes": 1000, "files": {"model.onnx": {"bytes": 1000, "sha256": "a" * 64}}, "params": 500, "bytes_per_param": 2.0},
          "parity": {"max_abs_err": 0.1, "mean_abs_err": 0.01, "cosine_min": 0.99, "top1_agreement": 0.9, "kl_mean": 0.05,
                     "kl_p99": 0.3, "ppl_reference": 3.0, "ppl": 3.1, "greedy_match": 30, "greedy_total": 32, "eval_tokens": 128},
          "latency": {"threads": 2, "load_s": 0.1, "ttft_ms": 5.0, "prefill_tok_s": 100.0, "decode_tok_s": 50.0,
                      "decode_ms_p50": 20.0, "decode_ms_p90": 25.0},
          "memory": {"peak_rss_mb": 80.0}, "gates": [{"name": "kl_mean_max", "value": 0.05, "limit": 0.1, "passed": True}],
          "passed": True}
    checked(v1, "v1")
    assert "| onnx-int4 | PASS |" in markdown([v1]) and "0.05" in markdown([v1])
    page = html_page([v1])
    assert "onnx-int4" in page and 'class="errorbar"' not in page and "No greedy text" in page
    assert 'name="kl_mean_max"' in junit([v1])


def test_parity_metrics_match_the_textbook_formulas_over_many_blocks_of_positions():
    """per_token works on blocks of positions; the metrics over 37 positions (not a multiple of a block) equal
    the definitions computed on the whole arrays by torch: KL(p_ref || p_art), perplexities, |err|, cosine."""
    import torch

    rng = np.random.default_rng(4)
    ref = rng.normal(scale=3.0, size=(37, 300)).astype(np.float32)
    art = ref + rng.normal(scale=0.3, size=ref.shape).astype(np.float32)
    targets = next_tokens(list(rng.integers(0, 300, len(ref))))
    m, series = parity_metrics(art, ref, targets)
    lp, lq = torch.log_softmax(torch.from_numpy(ref).double(), -1), torch.log_softmax(torch.from_numpy(art).double(), -1)
    kl = torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="none").sum(-1).numpy()
    rows, tok = np.arange(len(ref) - 1), torch.from_numpy(targets[:-1])
    assert np.allclose(series["kl_per_token"], kl, rtol=1e-5) and np.isclose(m["kl_mean"], kl.mean(), rtol=1e-9)
    assert np.isclose(m["ppl_reference"], float(torch.exp(-lp[rows, tok].mean())), rtol=1e-9)
    assert np.isclose(m["ppl"], float(torch.exp(-lq[rows, tok].mean())), rtol=1e-9)
    assert np.isclose(m["mean_abs_err"], np.abs(art.astype(np.float64) - ref).mean(), rtol=1e-9)
    assert np.isclose(m["max_abs_err"], np.abs(art.astype(np.float64) - ref).max(), rtol=1e-9)
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(art), torch.from_numpy(ref), dim=-1).numpy()
    assert np.isclose(m["cosine_min"], cos.min(), rtol=1e-5)
    assert m["top1_agreement"] == float((art.argmax(-1) == ref.argmax(-1)).mean())
