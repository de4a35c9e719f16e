"""The task half of the sampler benchmark: settings run on the same batches, exact settings agree with the reference."""

import pytest

from mmdlm.eval.sampler_quality import SETTINGS, build_tasks, format_quality_table, run_sampler_quality


def test_build_tasks_covers_vqa_captions_and_digits():
    items = build_tasks(3)
    tasks = [it["task"] for it in items]
    assert tasks.count("caption") == 3 and tasks.count("digit") == 3 and 1 <= tasks.count("vqa") <= 3


def test_exact_fast_setting_agrees_with_reference_and_reports_costs(tiny_pipeline):
    result = run_sampler_quality(tiny_pipeline, n=2, batch_size=4, settings=["fast-exact", "fast+t0.7"], gen_length=8)
    s = result["settings"]
    assert list(s) == ["llada", "fast-exact", "fast+t0.7"]  # the reference is always run, first
    assert s["llada"]["agreement_vs_llada"] == 1.0 and s["fast-exact"]["agreement_vs_llada"] == 1.0
    assert s["llada"]["speedup_vs_llada"] == 1.0
    for r in s.values():
        assert set(r["accuracy"]) == {"vqa", "caption", "digit"} and all(0 <= v <= 1 for v in r["accuracy"].values())
        assert r["tokens_per_forward"] >= 0 and r["seconds"] > 0
    # the reference commits gen_length / steps = 1 token per forward: the threshold rule can only do as well or better
    assert s["fast+t0.7"]["nfe_per_batch"] <= s["llada"]["nfe_per_batch"]
    assert "fast-exact" in format_quality_table(result)


def test_unknown_setting_is_refused(tiny_pipeline):
    with pytest.raises(ValueError, match="unknown sampler settings"):
        run_sampler_quality(tiny_pipeline, n=1, settings=["warp-speed"])
    assert "llada" in SETTINGS


def test_ar_twin_runs_on_the_same_items_as_one_more_row(tiny_pipeline, tiny_model_dir):
    from mmdlm.pipeline import MMDLMPipeline

    ar = MMDLMPipeline.from_pretrained(tiny_model_dir, device="cpu")
    ar.model.config.is_causal = True  # the forward reads the flag: same weights, causal mask
    result = run_sampler_quality(tiny_pipeline, n=2, batch_size=4, settings=["llada"], gen_length=8, ar_pipe=ar)
    s = result["settings"]
    assert list(s) == ["llada", "ar-twin"]
    twin = s["ar-twin"]
    assert set(twin["accuracy"]) == {"vqa", "caption", "digit"} and twin["seconds"] > 0
    # greedy decoding: one forward per new token, at most gen_length of them, so at most 1 token per row-forward
    assert 1 <= twin["nfe_per_batch"] <= 8 and twin["tokens_per_forward"] <= 1.0 + 1e-9
    assert "ar-twin" in format_quality_table(result)
    with pytest.raises(ValueError, match="causal"):
        run_sampler_quality(tiny_pipeline, n=1, settings=["llada"], gen_length=8, ar_pipe=tiny_pipeline)
