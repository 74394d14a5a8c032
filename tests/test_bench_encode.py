"""benchmarks/encode.py: its CPU smoke run prints rows whose numbers agree with each other,
with transformers' row (run in the child process) beside jaxformer's."""
import json

import encode  # benchmarks/ (conftest puts it on the path)
import profile_encode


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


def test_profile_encode_reads_matmul_epilogues_and_runs_on_cpu(capsys):
    hlo = """
  %cublas-gemm.1 = (f16[512,4096]{1,0}, s8[0]{0}) custom-call(%a, %b, %bias), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"epilogue":"BIAS_GELU"}}
  %cublas-gemm.2 = (f16[512,1024]{1,0}, s8[0]{0}) custom-call(%c, %d), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"epilogue":"DEFAULT"}}
  %fusion.3 = f16[512,1024]{1,0} fusion(%e), kind=kLoop, calls=%fused_computation.3
  %fusion.4 = f32[512]{0} fusion(%f), kind=kInput, calls=%fused_computation.4
"""
    got = profile_encode.hlo_summary(hlo)
    assert got == {"matmul calls": 2, "dots left in HLO": 0,
                   "epilogues": {"BIAS_GELU": 1, "DEFAULT": 1},
                   "fusions": {"kLoop": 1, "kInput": 1}}
    src = profile_encode.hlo_sources(
        '  %loop_convert_fusion.23 = f16[128,384,4096]{2,1,0} fusion(%g), kind=kLoop, '
        'calls=%c.5, metadata={op_name="jit(f)/while/body/gelu/convert_element_type"}')
    # the kernel's name is the fusion's with '.' as '_': traced back to its jax op
    assert src == {"loop_convert_fusion_23": ("f16[128,384,4096]{2,1,0}",
                                              "jit(f)/while/body/gelu/convert_element_type")}
    assert profile_encode.kind("sm90_xmma_gemm_f16f16_f16f32") == "matmul"
    assert profile_encode.kind("flash_attention_fwd") == "attention"
    assert profile_encode.kind("loop_add_fusion") == "other"
    assert profile_encode.main(["bert-smoke:2:16", "--dtype", "float32"]) == 0
    text = capsys.readouterr().out
    assert "bert-smoke float32 batch 2 x seq 16 (padded)" in text
    # the CPU program leaves its matmuls as dots (the smoke model has weights, so some)
    assert int(text.split("dots left in HLO: ")[1].split()[0]) > 0
