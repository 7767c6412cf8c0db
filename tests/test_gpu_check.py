"""scripts/gpu_check.py (benchmarks/gpu_check.py): the GPU acceptance check's report, produced on the CPU at tiny
widths (``--device cpu --tiny``), with its JSON fields asserted; the peak table and the goal verdicts."""

import json

import pytest

import pag
from benchmarks import gpu_check
from benchmarks.speed import evaluate_goals
from benchmarks.timing import peak_fp16_tflops


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    code = gpu_check.main(["--device", "cpu", "--tiny", "--threads", "1", "--out", str(out)])
    data = json.loads((out / "report.json").read_text())
    data["_exit_code"] = code
    data["_markdown"] = (out / "report.md").read_text()
    return data


def test_tiny_cpu_report(report):
    assert report["_exit_code"] == 0, report["errors"]
    assert report["schema"] == 1 and report["ok"] is True and report["errors"] == {}
    assert report["tiny"] is True and report["gpu_run"] is False and report["low_precision"] == "bfloat16"
    device = report["device"]
    assert device["type"] == "cpu" and device["gpu"] is False and device["peak_fp16_tflops"] is None
    assert report["profile"]["batch_sizes"] == [1, 2]

    health = report["health"]
    methods = {"unguided", "sag", "pag identity + classifier"} | {f"pag {k}" for k in pag.REGISTRY}
    assert {c["method"] for c in health["cases"]} == methods
    assert {c["arch"] for c in health["cases"]} == {"256x256_diffusion_uncond", "256x256_diffusion"}
    assert len(health["cases"]) == 2 * len(methods) * 3 and health["timesteps"] == [999, 500, 10]
    for case in health["cases"]:
        assert case["ok"] and case["finite_eps"] and case["nonfinite_attention_blocks"] == []
        assert 0 < case["rel_rms"] <= case["tolerance"] and case["max_abs_attention_output"] > 0
    assert health["tolerance"] == {"unguided": 8e-2, "guided": 0.24} and "2^-11" in health["tolerance_why"]
    assert set(health["weights"].values()) == {"random"}

    speed = report["speed"]
    rows = {(r["batch"], r["variant"]): r for r in speed["rows"]}
    assert set(rows) == {(b, v) for b in (1, 2) for v in ("unguided", "two_pass", "engine", "engine_sequential")}
    for row in rows.values():
        assert row["ms_per_step"] > 0 and row["images_per_s_ddim25"] > 0 and row["error"] is None
        assert row["gflop"] > 0 and row["tflops_per_s"] > 0 and row["peak_share"] is None and row["peak_mib"] is None
    for batch in (1, 2):  # the shared prefix saves work: the engine counts fewer FLOPs than two full passes
        unguided, engine, two_pass = (rows[(batch, v)]["gflop"] for v in ("unguided", "engine", "two_pass"))
        assert unguided < engine < two_pass < 2 * unguided  # the identity map computes no Q K^T
        assert rows[(batch, "engine_sequential")]["gflop"] == pytest.approx(engine, rel=1e-3)
    assert rows[(2, "unguided")]["gflop"] == pytest.approx(2 * rows[(1, "unguided")]["gflop"], rel=1e-3)
    options = {o["option"]: o for o in speed["options"]}
    assert options["bfloat16"]["unguided_ms"] > 0 and options["bfloat16"]["engine_ms"] > 0
    assert options["bfloat16 + channels_last"]["engine_vs_unguided"] > 0 and options["float32"]["unguided_ms"] > 0
    assert "skipped" in options["float16 + compile"]["error"] and "skipped" in options["float16"]["error"]

    goals = {g["goal"]: g for g in report["goals"]}
    assert set(goals) == {"engine_vs_unguided", "naive_vs_engine", "unguided_peak_share"}
    assert all(g["status"] == "not measured (no GPU)" and g["value"] is None for g in goals.values())
    assert goals["engine_vs_unguided"]["cpu_value"] > 0 and goals["engine_vs_unguided"]["target"] == "<= 1.8"

    sampler = report["sampler"]
    assert sampler["ok"] and all(sampler["checks"].values()) and sampler["resume_noop"] is True
    assert sampler["first_exit_code"] == sampler["second_exit_code"] == 0
    assert sampler["npz"]["shape"] == [4, 64, 64, 3] and sampler["npz"]["dtype"] == "uint8"
    assert sampler["npz"]["arrays"] == ["arr_0", "arr_1"] and sampler["npz"]["labels_dtype"] == "int64"
    assert "--use_ddim True" in sampler["command"] and "--timestep_respacing ddim25" in sampler["command"]
    syncs = sampler["host_syncs_per_step"]
    assert set(syncs) == {"1", "3"} and syncs["1"] == syncs["3"] > 0

    features = report["features"]
    assert features["random_weights"] is True and features["marker"] == "RANDOM-WEIGHTS"
    assert features["images_per_s"] > 0 and features["pool_shape"] == [2, 2048]

    markdown = report["_markdown"]
    assert "this report was not run on a GPU" in markdown and "not measured (no GPU)" in markdown
    for title in ("## 1. bfloat16 health", "## 2. Speed per guided step", "## Goals", "## 3. Sampler end to end",
                  "## 4. Evaluator feature extraction", "RANDOM-WEIGHTS"):
        assert title in markdown


def test_peaks_by_device_name():
    peaks = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H200": 989.0,
             "NVIDIA A100-SXM4-80GB": 312.0, "Tesla V100-SXM2-16GB": 125.0, "NVIDIA L40S": 362.0,
             "NVIDIA GeForce RTX 4090": 165.0, "NVIDIA GeForce GTX 1080": None}
    for name, peak in peaks.items():
        assert peak_fp16_tflops(name) == peak, name


def test_goal_verdicts_on_a_gpu():
    import torch

    def speed(unguided, engine, two_pass, shares):
        rows = [{"batch": 32, "variant": v, "ms_per_step": ms}
                for v, ms in (("unguided", unguided), ("engine", engine), ("two_pass", two_pass))]
        options = [{"option": name, "peak_share": share} for name, share in shares.items()]
        return {"rows": rows, "options": options}

    cuda = torch.device("cuda", 0)
    met = evaluate_goals(speed(100.0, 170.0, 200.0, {"float16": 0.3, "bfloat16 + compile": 0.45,
                                                     "float32 (TF32 convolutions)": 0.9}),
                         cuda, gpu_check.FULL)
    assert [g["status"] for g in met] == ["met", "met", "met"]
    assert met[2]["best_option"] == "bfloat16 + compile" and met[2]["value"] == 0.45  # float32 does not count
    missed = evaluate_goals(speed(100.0, 185.0, 200.0, {"float16": 0.39}), cuda, gpu_check.FULL)
    assert [g["status"] for g in missed] == ["NOT met", "NOT met", "NOT met"]  # 1.85 > 1.8; 1.08 < 1.1; 39 %
    unknown = evaluate_goals(speed(100.0, 150.0, 200.0, {"float16": None}), cuda, gpu_check.FULL)
    assert unknown[2]["status"] == "not measured (device peak unknown)"


@pytest.fixture
def no_gpu(monkeypatch, tmp_path):
    """torch.cuda says no GPU (a driver too old for the wheel's CUDA looks so); the check's sections refuse to run."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    for name in ("check_health", "check_speed", "check_sampler", "check_features"):
        monkeypatch.setattr(gpu_check, name, lambda *a, **k: pytest.fail("ran a section without a GPU"))
    driver = tmp_path / "version"
    driver.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  470.82.01  Tue Oct 26 21:21:13 UTC 2021\n"
                      "GCC version:  gcc version 9.3.0\n")
    monkeypatch.setattr(gpu_check, "DRIVER_VERSION_FILE", str(driver))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return monkeypatch


def test_no_gpu_stops_at_once_naming_wheel_and_driver(no_gpu, tmp_path, capsys):
    out = tmp_path / "out"
    for argv in ([], ["--device", "cuda"], ["--device", "cuda:1", "--tiny"]):
        assert gpu_check.main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == (
            "error: no usable CUDA GPU (torch.cuda.is_available() is False): torch "
            f"{__import__('torch').__version__} is built for CUDA 12.4, NVIDIA driver 470.82.01 "
            f"({gpu_check.DRIVER_VERSION_FILE}); install a torch wheel built for a CUDA version this driver supports "
            "(nvidia-smi's \"CUDA Version\" is the newest), or run the check on the CPU: --device cpu --tiny "
            "(make gpu-check GPU_CHECK_FLAGS=\"--device cpu --tiny\")\n")
        assert not out.exists()  # stopped before anything was written


def test_no_gpu_message_without_a_driver_or_from_nvidia_smi(no_gpu, tmp_path, capsys):
    no_gpu.setattr(gpu_check, "DRIVER_VERSION_FILE", str(tmp_path / "absent"))
    no_gpu.setenv("PATH", str(tmp_path / "bin"))  # no nvidia-smi
    no_gpu.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "built for CUDA 12.4, no NVIDIA driver found, CUDA_VISIBLE_DEVICES='' hides the GPUs; install the " \
           "NVIDIA driver" in err and "--device cpu --tiny" in err and err.count("\n") == 1
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho 535.54.03\n")
    smi.chmod(0o755)
    no_gpu.delenv("CUDA_VISIBLE_DEVICES")
    assert gpu_check.nvidia_driver_version() == ("535.54.03", "nvidia-smi")
    no_gpu.setattr(__import__("torch").version, "cuda", None)
    message = gpu_check.no_gpu_message()
    assert "is a CPU-only build, NVIDIA driver 535.54.03 (nvidia-smi); install a torch wheel" in message
