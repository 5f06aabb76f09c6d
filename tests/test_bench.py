"""`msrnn bench` runs end to end on a tiny model and reports what it measured (timings are
benchmarks, not tested; the arithmetic around them is)."""

import json
import sys

import pytest

import msrnn
from msrnn.experiments import bench, llamacpp
from msrnn import cli
from tiny import save, tiny_hf


def test_kv_bytes_per_slot_of_a_model_and_its_compiled_step(tmp_path):
    """A slot: a key and a value of head_dim 16 for 2 KV heads in 2 layers, float32."""
    model = msrnn.load(save(tiny_hf("llama"), tmp_path / "model"))
    assert bench.kv_bytes_per_slot(model) == 2 * 2 * 2 * 16 * 4
    assert bench.kv_bytes_per_slot(model.compile_step()) == 2 * 2 * 2 * 16 * 4


def test_step_times_before_the_first_measured_position_stay_above_zero():
    """Throughput sums step times over every position, some before the first measured one. A
    line through two measurements, the second one slowed by a busy machine, crosses zero there:
    the sum is held above it by the line from (0, 0) to the first; clean ones keep their line."""
    xs, noisy = [129, 160, 192], [1.0, 2.5, 1.0]
    assert 1.0 + 1.5 * (0 - 129) / 31 < 0                             # the line itself
    steps = [bench._interpolate(xs, noisy, p) for p in range(256)]
    assert min(steps[1:]) > 0 and steps[0] == 0 and sum(steps) > 0
    assert bench._interpolate(xs, noisy, 150) == 1.0 + 1.5 * 21 / 31   # between: the line
    clean = [1.0, 1.125, 1.25]
    assert bench._interpolate(xs, clean, 0) == 1.0 + 0.125 * (0 - 129) / 31 > 0   # its line


def test_bench_latency_throughput_ceiling(tmp_path, capsys):
    model = save(tiny_hf("llama"), tmp_path / "model")
    out = tmp_path / "bench"
    code = cli.main(["bench", model, "--parts", "prefill,latency,throughput,ceiling", "--lengths",
                     "64,128", "--latency-size", "16", "--length", "256", "--full-batch", "2",
                     "--throughput-sizes", "32,16", "--dtypes", "float32", "--prefill-tokens",
                     "48", "--size", "8", "--no-compile", "--quantize", "int8",
                     "--out", str(out)])
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    assert [(r["policy"], r["size"], r["length"]) for r in report["latency"]] == [
        ("full", None, 64), ("full", None, 128), ("tova", 16, 64), ("tova", 16, 128)]
    assert all(r["ms"] > 0 for r in report["latency"])
    # The key-value budget holds 2 full sequences of 256 tokens = 512 slots; TOVA(k) needs k + 1.
    # The same table with int8 weights: the key-value budget is the same (float32 states).
    rows = report["throughput"]
    assert [(r["weights"], r["policy"], r["size"], r["batch"], r["ragged"]) for r in rows] == [
        (w, *row) for w in ("float32", "int8") for row in [
            ("full", None, 2, False), ("tova", 32, 512 // 33, False),
            ("tova", 16, 512 // 17, False), ("full", None, 2, True),
            ("tova", 32, 512 // 33, True), ("tova", 16, 512 // 17, True)]]
    assert all(rows[i]["vs_full"] == 1 for i in (0, 3, 6, 9))
    assert all(r["tok_s"] > 0 for r in rows)
    assert [(r["impl"], r["policy"], r["mode"]) for r in report["prefill"]] == [
        ("transformers", "full", "-"), ("msrnn", "full", "-"), ("msrnn", "tova(8)", "oneshot"),
        ("msrnn", "tova(8)", "sequential")]
    assert all(r["tok_s"] > 0 for r in report["prefill"])
    # 2 layers of (q 64 + k, v 2 * 32 + o 64) x 64 + MLP 3 x 64 x 96, their norms, the final norm
    # and the (untied) head; the embedding table is only looked up, one row a token.
    matrices = 128 * 64 + 64 * 64 + 3 * 64 * 96
    n_params = 2 * (matrices + 2 * 64) + 64 + 128 * 64
    assert report["ceiling"]["float32"]["weight_mb_per_token"] == n_params * 4 / 2**20
    # int8: a byte per matrix entry, a float32 scale per output row (q/k/v 128, o 64, gate/up
    # 192, down 64; head 128), the norms in float32.
    int8 = 2 * (matrices + 4 * (128 + 64 + 192 + 64) + 4 * 2 * 64) + 4 * 64 + 128 * 64 + 4 * 128
    assert report["ceiling"]["int8"]["weight_mb_per_token"] == int8 / 2**20
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "| tova(32) | float32 | 15 |" in printed and "| tova(32) | int8 | 15 |" in printed and "| full | eager | 128 |" in printed


def test_compiled_speed_leaves_out_compilation(tmp_path, monkeypatch):
    """A compilation made slow on purpose (8 s) is reported as compile_s, not in tok_s."""
    import torch

    from msrnn.policies import TOVA
    from tiny import slow_compilation

    slow_compilation(monkeypatch, 8)
    model = msrnn.load(save(tiny_hf("llama"), tmp_path / "model"))
    row = bench.msrnn_speed(model, torch.tensor([[5, 6, 7, 8]]), TOVA(8), 10, compiled=True)
    assert row["compile_s"] >= 8 and 10 / row["tok_s"] < 8
    assert bench.msrnn_speed(model, torch.tensor([[5, 6, 7, 8]]), TOVA(8), 10,
                             compiled=False)["compile_s"] == 0


def test_llamacpp_part_needs_llama_cpp_python_and_says_how_to_install(tmp_path, capsys,
                                                                     monkeypatch):
    """CI never compiles llama-cpp-python: `--parts llamacpp` without it is one line naming the
    extra, before any work; an unknown kind of weights is refused first."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)          # import llama_cpp fails
    model = save(tiny_hf("llama"), tmp_path / "model")
    for argv, words in ((["--weights", "int3"], "--weights: unknown int3; choose from float32, "
                         "bfloat16, int8, int4"),
                        ([], "needs llama-cpp-python: pip install 'msrnn[llamacpp]'")):
        assert cli.main(["bench", model, "--parts", "llamacpp", *argv]) == 2
        assert words in capsys.readouterr().err


def test_llamacpp_table_ranges_and_ratios(capsys):
    """The side-by-side table: each implementation's range over the rounds, msrnn Full over
    llama.cpp and TOVA over Full as ratios of the means."""
    from msrnn.cli.bench import print_report
    rows = [{"weights": w, "impl": impl, "policy": policy, "size": 64 if policy == "tova" else
             None, "round": r, "tok_s": rate}
            for w, rates in (("int8", (66.0, 70.0, 60.0, 66.0, 63.0, 63.0)),
                             ("float32", (34.0, 35.0, 36.0, 36.0, 36.0, 36.0)))
            for r in (0, 1) for impl, policy, rate in (
                ("llama.cpp", "full", rates[r]), ("msrnn compiled", "full", rates[2 + r]),
                ("msrnn compiled", "tova", rates[4 + r]))]
    table = llamacpp.table(rows)
    assert [t["weights"] for t in table] == ["int8", "float32"]
    assert table[0]["llama_cpp"] == [66.0, 70.0] and table[0]["msrnn_tova"] == [63.0, 63.0]
    assert table[0]["full_vs_llama_cpp"] == pytest.approx(126 / 136)
    assert table[0]["tova_vs_full"] == pytest.approx(1.0)
    assert table[1]["full_vs_llama_cpp"] == pytest.approx(72 / 69)
    print_report({"llamacpp": rows})
    printed = capsys.readouterr().out
    assert "| int8 | Q8_0 | 66.0-70.0 | 60.0-66.0 | 0.93x | 63.0-63.0 | 1.00x |" in printed


def test_a_row_runs_in_a_fresh_process_and_a_failed_one_says_why(tmp_path):
    """bench.in_fresh_process (every speed row, msrnn's and llama.cpp's): the row the child
    prints last comes back; a child that fails raises with its own error."""
    from msrnn.experiments import bench
    model = save(tiny_hf("llama"), tmp_path / "model")
    spec = {"impl": "msrnn eager", "policy": "tova", "size": 8, "dtype": "float32",
            "weights": "float32", "model": model, "device": "cpu", "prompt_tokens": 4,
            "new_tokens": 3, "quantize": None}
    row = bench.in_fresh_process("msrnn.experiments.bench", spec)
    assert row["impl"] == "msrnn eager" and row["tok_s"] > 0
    with pytest.raises(RuntimeError, match="(?s)failed .*model directory not found"):
        bench.in_fresh_process("msrnn.experiments.bench", {**spec, "model": str(tmp_path / "x")})
