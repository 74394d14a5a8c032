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
