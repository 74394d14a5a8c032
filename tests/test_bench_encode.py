"""benchmarks/encode.py: its CPU smoke run prints rows whose numbers agree with each other,
with transformers' row (run in the child process) beside jaxformer's."""
import json

import encode  # benchmarks/ (conftest puts it on the path)


def test_encode_smoke_rows_are_consistent(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert encode.main(["--smoke", "--batches", "2", "--iters", "2", "--varlen",
                        "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "measured bf16 matmul" in text and "bert-smoke" in text
    data = json.loads(out.read_text())
    rows, tflops = data["rows"], data["ceilings"]["matmul_TFLOPs"]
    assert [r["layout"] for r in rows] == ["padded", "padded varlen", "packed varlen"]
    cfg = encode.config("bert-smoke")
    for r in rows:
        lengths = encode.lengths_for(2, 16, "varlen" in r["layout"])
        assert r["tokens"] == sum(lengths)
        assert abs(r["tok_s"] - r["tokens"] / (r["avg_ms"] / 1e3)) < 1e-6 * r["tok_s"]
        want = encode.flops(cfg, lengths) / (r["avg_ms"] / 1e3) / (tflops * 1e12)
        assert abs(r["mfu"] - want) < 1e-9 + 1e-6 * want
        assert r["p99_ms"] >= r["avg_ms"] * 0.5 and r["hf_sdpa"]["avg_ms"] > 0
    # the packed layout holds both texts in one row; padded: a row each
    assert rows[2]["shape"][0] == 1 and rows[1]["shape"][0] == 2


def test_flops_count_weights_and_attention():
    cfg = encode.config("bert-base")
    D, F, L = 768, 3072, 12
    assert encode.flops(cfg, [128]) == 2 * 128 * L * (4 * D * D + 2 * D * F) \
        + 4 * L * 128 * 128 * D
