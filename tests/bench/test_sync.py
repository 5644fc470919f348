"""`lorasync bench sync` reports what it measured, consistently: the sizes each strategy must send
(computed here from the same model and adapter), parity within the dtype's tolerance, and
ratios and choices that follow from its own medians. Timings themselves are not asserted
(a shared 2-core machine); the relations between the numbers are."""

import json

import pytest
import torch

from lorasync.bench.sync import BenchConfig, bench_model_dir, bench_policy
from lorasync.sync.merge_kernel import Kernel
from lorasync.sync.verify import TOLERANCES
from lorasync.sync.weight_sync import WeightSync
from tests.helpers import MemoryReceiver, run_lorasync

pytestmark = pytest.mark.vllm
BF16 = 2  # bytes per element


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The benchmark's JSON (with the server path), and the sizes it must report."""
    cwd = tmp_path_factory.mktemp("bench")
    r = run_lorasync("bench", "sync", "--shape", "tiny", "--rank", "4", "--repeats", "2", "--server",
                     "--json", cwd=cwd, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)  # the server's output must not reach stdout
    config = BenchConfig(shape="tiny", rank=4, cache_dir=str(cwd / "runs" / "bench"))
    model_dir = bench_model_dir(config)  # made by the run
    trainer = bench_policy(model_dir, config)
    engine = MemoryReceiver(model_dir, "bfloat16")
    plan, layout = WeightSync(trainer, engine).plan, engine.checkpoint_layout()
    sizes = {e.checkpoint: BF16 * torch.Size(layout[e.checkpoint]).numel() for e in plan.changed}
    lora = [p for n, p in trainer.named_parameters() if "lora_" in n]
    expected = {
        "changed_tensors": len(plan.changed),
        "changed_bytes": sum(sizes.values()),
        "largest_bytes": max(sizes.values()),
        "all_tensors": len(layout),
        "all_bytes": BF16 * sum(torch.Size(s).numel() for s in layout.values()),
        "lora_tensors": len(lora),
        "lora_bytes": BF16 * sum(p.numel() for p in lora),
    }
    return result, expected


def test_each_strategy_sends_what_its_plan_says(bench):
    result, want = bench
    s = result["strategies"]
    other = next(k.value for k in Kernel if k.value != result["merge_kernel"]["kernel"])
    assert set(s) == {"streaming", f"streaming:{other}", "merge-unmerge", "adapter"}
    streaming, baseline, adapter = s["streaming"], s["merge-unmerge"], s["adapter"]
    for name in ("streaming", f"streaming:{other}"):  # either kernel sends the same tensors
        assert (s[name]["tensors_sent"], s[name]["bytes_sent"]) == (want["changed_tensors"], want["changed_bytes"])
    # streaming sends the changed groups, exactly the floor's tensors; merge-unmerge all of them
    assert (streaming["tensors_sent"], streaming["bytes_sent"]) == (want["changed_tensors"], want["changed_bytes"])
    assert result["floor"]["bytes_sent"] == streaming["bytes_sent"]
    assert (baseline["tensors_sent"], baseline["bytes_sent"]) == (want["all_tensors"], want["all_bytes"])
    assert baseline["tensors_sent"] > streaming["tensors_sent"]
    assert result["largest_tensor_bytes"] == want["largest_bytes"]
    # the adapter sends the LoRA factors: a small fraction of the merged tensors
    assert (adapter["tensors_sent"], adapter["bytes_sent"]) == (want["lora_tensors"], want["lora_bytes"])
    assert adapter["bytes_sent"] < 0.1 * streaming["bytes_sent"]


def test_every_strategy_keeps_parity_and_only_merge_unmerge_drifts_the_base(bench):
    result, _ = bench
    tolerance = TOLERANCES["bfloat16"]
    for name, stats in result["strategies"].items():
        assert stats["max_abs_logprob_diff"] <= tolerance, name
        assert 0 < stats["min_s"] <= stats["median_s"], name
    assert all(v["base_max_abs_change"] == 0 for k, v in result["strategies"].items() if k.startswith("streaming"))
    assert result["strategies"]["adapter"]["base_max_abs_change"] == 0
    assert result["strategies"]["merge-unmerge"]["base_max_abs_change"] > 0  # bf16 round trips


def test_ratios_and_the_auto_choice_follow_from_the_medians(bench):
    result, _ = bench
    s, floor = result["strategies"], result["floor"]
    assert 0 < floor["min_s"] <= floor["median_s"]
    assert result["speedup_vs_merge_unmerge"] == pytest.approx(
        s["merge-unmerge"]["median_s"] / s["streaming"]["median_s"]
    )
    assert result["ratio_to_floor"] == pytest.approx(s["streaming"]["median_s"] / floor["median_s"])
    decode = result["decode"]
    assert decode["tokens"] == decode["prompts"] * 32
    assert decode["merged_over_adapter_throughput"] == pytest.approx(
        decode["adapter_s_per_token"] / decode["merged_s_per_token"]
    )
    auto = result["auto"]
    per_token = {"streaming": decode["merged_s_per_token"], "adapter": decode["adapter_s_per_token"]}
    assert auto["tokens_per_step"] == decode["tokens"]
    cost = {k: s[k]["median_s"] + decode["tokens"] * per_token[k] for k in per_token}
    assert auto["seconds_per_step"] == pytest.approx(cost)
    assert auto["strategy"] == min(cost, key=cost.get)


def test_the_server_sends_factors_compressed_and_keeps_parity(bench):
    result, want = bench
    server = result["server"]
    merged = server["merged_changed_bytes"]
    assert merged == want["changed_bytes"] == server["pristine_bytes"]
    for key in ("compressed", "raw"):
        stats = server[key]
        assert stats["max_abs_logprob_diff"] <= TOLERANCES["bfloat16"], key
        assert stats["wire_over_merged"] == pytest.approx(stats["wire_bytes"] / merged), key
        assert 0 < stats["min_s"] <= stats["median_s"], key
    # raw: the adapter's factors (biases the server holds are not sent) and a manifest
    assert 0 < server["raw"]["wire_bytes"] - want["lora_bytes"] < 4096
    assert server["compressed"]["wire_bytes"] < 0.9 * server["raw"]["wire_bytes"]


def test_the_machine_the_kernel_and_the_roofline_are_recorded(bench):
    """Numbers differ 10x between CPUs: the result says which CPU, which ISA torch used, and
    which merge kernel ran and why (what each took when measured)."""
    result, want = bench
    machine, kernel, roof = result["machine"], result["merge_kernel"], result["roofline"]
    assert machine["cpu_model"] and machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["torch_threads"] == torch.get_num_threads()
    measured = kernel["measured_s"]  # bf16 on a CPU: both kernels timed, the faster one kept
    assert set(measured) == {k.value for k in Kernel} and kernel["kernel"] == min(measured, key=measured.get)
    assert roof["float32_gemm_gflops"] > 0
    for name in measured:
        r = roof[name]
        assert r["tensors"] > 0 and r["gflops"] == pytest.approx(r["gflop"] / r["merge_s"])
    assert result["memory_budget_bytes"] == result["floor"]["peak_extra_bytes"] + 2 * want["largest_bytes"]
    assert result["server"]["merge_kernel"] in {k.value for k in Kernel}


def test_bench_sync_measures_a_given_model_folder(tiny_model, tmp_path):
    """--model DIR: the strategies on that model (here a tiny llama, not the random qwen2
    the benchmark builds otherwise), every one in parity, nothing built in the cache."""
    model = tiny_model("llama")
    r = run_lorasync("bench", "sync", "--model", model, "--rank", "4", "--repeats", "1", "--json",
                     cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert result["config"]["model"] == model
    assert {"streaming", "merge-unmerge", "adapter"} <= set(result["strategies"])
    for name, s in result["strategies"].items():
        assert s["max_abs_logprob_diff"] <= TOLERANCES["bfloat16"], (name, s)
    assert not (tmp_path / "runs" / "bench").exists()
