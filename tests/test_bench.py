"""`jaxformer bench` (jaxformer/bench.py, also benchmarks/generate.py): its CPU smoke run
prints a row per shape and mode whose numbers are consistent with each other."""
import json

from jaxformer import cli


def test_bench_tiny_prints_consistent_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert cli.main(["bench", "--tiny", "--batches", "1", "2", "--prompts", "16", "--new", "4",
                     "--quantize", "none,int8", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "measured ceilings" in text and "demo" in text
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["quant"]) for r in rows] == [(1, "none"), (1, "int8"), (2, "none"),
                                                         (2, "int8")]
    for r in rows:
        # tokens/s is batch x new tokens over TTFT + the remaining steps
        total_s = (r["ttft_ms"] + r["step_ms"] * 3) / 1e3
        assert abs(r["tok_s"] - r["batch"] * 4 / total_s) < 1e-6 * r["tok_s"]
        assert r["step_bytes"] > r["weight_GB"] * 1e9 > 0
    int8 = next(r for r in rows if r["quant"] == "int8")
    none = next(r for r in rows if r["quant"] == "none")
    assert int8["weight_GB"] < none["weight_GB"]  # the quantized rows count quantized bytes


def test_plan_shapes_skips_what_the_plan_rejects_and_finds_the_largest(monkeypatch):
    """Rows the memory plan says cannot fit are skipped with its numbers; --largest adds the
    largest multiple of 8 that fits (the next multiple does not); a prompt past the context
    is clipped to leave room for the new tokens."""
    import jaxformer as jf
    from jaxformer import bench, memory
    monkeypatch.setenv("JAXFORMER_DEVICE_MEMORY", "64GB")
    shapes = bench.plan_shapes(["gpt3-1.3b"], [128, 4096], [1, 4096], 128, "bfloat16", True,
                               [None])
    cfg = jf.ModelConfig.from_preset("gpt3-1.3b")
    assert {s["prompt"] for s in shapes} == {128, cfg.max_position_embeddings - 128}
    by = {(s["prompt"], s["batch"], s["largest"]): s for s in shapes}
    assert by[(128, 1, False)]["skip"] is None
    assert "plan" in by[(128, 4096, False)]["skip"]
    big = [s for s in bench.plan_shapes(["gpt3-1.3b"], [128], [1], 128, "bfloat16", True,
                                        [None]) if s["largest"]]
    assert len(big) == 1
    for s in big:
        def fits(b):
            return memory.plan(cfg, None, "bfloat16", batch=b, max_length=s["prompt"] + 128,
                               prompt_length=s["prompt"]).fits
        assert s["batch"] % 8 == 0 and fits(s["batch"]) and not fits(s["batch"] + 8)
