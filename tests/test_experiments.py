"""The reproduction configs and make targets: every experiment expands to the runs the paper needs."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from guided_diffusion.script_util import create_model_from_flags
from sampling.model_configs import load_model_config
from sampling.sweep import expand, load_sweep
from pag import PAPER_LAYERS_256, resolve_layers
from pag.perturbations import check_heads_fit

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))
PAPER = list(PAPER_LAYERS_256)


def cells_of(name):
    sweep = load_sweep(str(ROOT / "configs" / "experiments" / f"{name}.yaml"))
    return sweep, {cell.name: cell.settings.flat() for cell in expand(sweep)}


def test_every_experiment_expands_and_its_layers_exist():
    assert {p.stem for p in EXPERIMENTS} >= {
        "table1_uncond_ddpm250", "table1_uncond_ddim25", "table1_cond_ddpm250", "table1_cond_ddim25",
        "pag_cg_cond", "ablation_scale", "ablation_layers", "ablation_perturbation"}
    models = {}
    for path in EXPERIMENTS:
        sweep = load_sweep(str(path))
        assert sweep.ref_batch == "downloads/refs/VIRTUAL_imagenet256_labeled.npz"
        for cell in expand(sweep):
            settings = cell.settings.flat()
            assert settings["num_samples"] == 50000, (path.name, cell.name)
            name = Path(settings["model_path"]).stem
            if name not in models:
                with torch.device("meta"):
                    models[name] = create_model_from_flags("diffusion", load_model_config(name)["flags"])[0]
            if settings["pag_scale"]:
                resolve_layers(models[name], settings["pag_layers"])


def test_table1_cells_are_baseline_sag_and_paper_pag():
    for name, model, sampler in [("table1_uncond_ddpm250", "256x256_diffusion_uncond", ("250", False)),
                                 ("table1_cond_ddim25", "256x256_diffusion", ("ddim25", True))]:
        _, cells = cells_of(name)
        assert sorted(cells) == ["method-baseline", "method-pag", "method-sag"]
        for settings in cells.values():
            assert settings["model_path"].endswith(f"{model}.pt")
            assert (settings["timestep_respacing"], settings["use_ddim"]) == sampler
        pag_cell = cells["method-pag"]
        assert pag_cell["pag_scale"] == 3.0 and pag_cell["perturbation"] == "identity"
        assert list(pag_cell["pag_layers"]) == PAPER
        assert cells["method-baseline"]["pag_scale"] == 0 and cells["method-baseline"]["sag_scale"] == 0
        assert cells["method-sag"]["sag_layer"] == "output_blocks.2.1"


def test_sag_anchor_scale_matches_the_sag_readme_convention():
    sweep, cells = cells_of("table1_uncond_ddpm250")
    assert cells["method-sag"]["sag_scale"] == 0.5  # their --guide_scale 1.5
    assert {a["label"].split(" (")[0] for a in sweep.anchors} == {"ADM baseline", "SAG s=0.5"}
    assert any(a["FID"] == 26.21 for a in sweep.anchors)


def test_ablations_cover_scales_layers_and_perturbations():
    _, cells = cells_of("ablation_scale")
    assert sorted(s["pag_scale"] for s in cells.values()) == [float(s) for s in range(11)]
    _, cells = cells_of("ablation_layers")
    layer_sets = [list(s["pag_layers"]) for s in cells.values()]
    with torch.device("meta"):
        model = create_model_from_flags("diffusion", load_model_config("256x256_diffusion_uncond")["flags"])[0]
    singles = [layers[0] for layers in layer_sets if len(layers) == 1]
    assert sorted(singles) == sorted(resolve_layers(model, "*"))  # each of the 16 attention blocks
    assert PAPER in layer_sets and len(layer_sets) == 17
    _, cells = cells_of("ablation_perturbation")
    assert sorted(s["perturbation"] for s in cells.values()) == [
        "blur", "drop", "identity", "noise", "random_mask", "seg", "seg", "skip", "temperature", "uniform"]
    assert sorted(s["seg_sigma"] for s in cells.values() if s["perturbation"] == "seg") == [10.0, 10000.0]


def test_cg_experiment_combines_pag_with_the_256_classifier():
    _, cells = cells_of("pag_cg_cond")
    assert len(cells) == 4
    for settings in cells.values():
        assert settings["classifier_path"].endswith("256x256_classifier.pt")
        assert settings["classifier_scale"] == 1.0
    assert {s["pag_scale"] for s in cells.values()} == {0.0, 3.0}


def make_dry(*args):
    """``make -n`` of the repository's Makefile as a user types it: not as a sub-make of `make test` (whose
    MAKEFLAGS/MAKELEVEL would add "Entering directory" lines and the outer make's flags)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    return subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, check=True, env=env).stdout


TABLE1 = ["table1_uncond_ddpm250", "table1_uncond_ddim25", "table1_cond_ddpm250", "table1_cond_ddim25", "pag_cg_cond"]
ROOT_OK = "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 "  # Open MPI refuses root without them


def test_make_dry_listing_of_reproduce_table1():
    out = make_dry("reproduce-table1", "GPUS=4", "NUM_SAMPLES=1000")
    for name in TABLE1:
        command = f"{ROOT_OK}.venv/bin/mpiexec -n 4 .venv/bin/python scripts/sweep.py configs/experiments/{name}.yaml"
        assert command in out
    assert out.count("--set num_samples=1000") == 5 and out.count(ROOT_OK) == 5


def test_make_reproduce_table1_with_another_launcher():
    out = make_dry("reproduce-table1", "LAUNCHER=srun")  # across SLURM nodes (the pip mpiexec stays on one node)
    for name in TABLE1:
        assert f"srun .venv/bin/python scripts/sweep.py configs/experiments/{name}.yaml --set num_samples=50000" in out
    assert "mpiexec" not in out and "OMPI_" not in out
    out = make_dry("ablation-scale", "LAUNCHER=torchrun --standalone --nproc_per_node 8 --no-python")
    assert ("torchrun --standalone --nproc_per_node 8 --no-python .venv/bin/python scripts/sweep.py "
            "configs/experiments/ablation_scale.yaml") in out
    out = make_dry("ablation-scale", "LAUNCHER=srun", "DRY_RUN=1")  # a dry run lists the cells, no launcher
    assert "srun" not in out and out.splitlines()[-1].startswith(".venv/bin/python scripts/sweep.py configs/")


@pytest.mark.parametrize("target", ["ablation-scale", "ablation-layers", "ablation-perturbation"])
def test_make_ablation_targets(target):
    out = make_dry(target)
    assert (f"{ROOT_OK}.venv/bin/mpiexec -n 8 .venv/bin/python scripts/sweep.py "
            f"configs/experiments/{target.replace('-', '_')}.yaml --set num_samples=50000") in out
    assert f"srun .venv/bin/python scripts/sweep.py configs/experiments/{target.replace('-', '_')}.yaml" in make_dry(
        target, "LAUNCHER=srun")


def test_make_gpu_check_does_not_reinstall():
    out = make_dry("-W", "setup.py", "gpu-check")  # setup.py newer than the environment: `install` would rerun
    assert "pip install" not in out and out.strip().endswith(".venv/bin/python scripts/gpu_check.py")


BEYOND_PAG_SAMPLERS = {"sampler-ddim25": ("ddim25", True), "sampler-ddpm250": ("250", False)}


def beyond_pag_cells(name):
    """``{method: {sampler: settings}}`` of one beyond-PAG sweep; each method exactly at both samplers."""
    _, cells = cells_of(name)
    methods = {}
    for cell, settings in cells.items():
        method, sampler = cell.split("__")
        assert (settings["timestep_respacing"], settings["use_ddim"]) == BEYOND_PAG_SAMPLERS[sampler], cell
        methods.setdefault(method.removeprefix("method-"), {})[sampler] = settings
    assert all(sorted(by_sampler) == sorted(BEYOND_PAG_SAMPLERS) for by_sampler in methods.values())
    return {method: by_sampler["sampler-ddim25"] for method, by_sampler in methods.items()}


def test_beyond_pag_uncond_cells_are_the_issue_21_comparison():
    methods = beyond_pag_cells("beyond_pag_uncond")
    assert sorted(methods) == sorted(["baseline", "pag", "softpag_a025", "softpag_a050", "softpag_a075",
                                      "softpag_a100", "pag_16x16", "head_0", "head_1", "head_2", "head_3", "tpg",
                                      "pag_apg_eta0", "pag_apg_eta05", "pag_rescale07"])
    for method, settings in methods.items():
        assert settings["model_path"].endswith("256x256_diffusion_uncond.pt")
        assert settings["icg_scale"] == 0
    assert methods["baseline"]["pag_scale"] == 0
    guided = {m: s for m, s in methods.items() if m != "baseline"}
    assert {s["pag_scale"] for s in guided.values()} == {3.0}
    pag = methods["pag"]
    assert pag["perturbation"] == "identity" and list(pag["pag_layers"]) == PAPER and not pag["pag_heads"]
    assert pag["apg_eta"] == 1.0 and pag["guidance_rescale"] == 0
    soft = {m: s for m, s in guided.items() if m.startswith("softpag")}
    assert sorted(s["soft_alpha"] for s in soft.values()) == [0.25, 0.5, 0.75, 1.0]
    assert all(s["perturbation"] == "soft" and list(s["pag_layers"]) == PAPER for s in soft.values())
    with torch.device("meta"):
        model = create_model_from_flags("diffusion", load_model_config("256x256_diffusion_uncond")["flags"])[0]
    heads = {m: s for m, s in guided.items() if m.startswith("head_") or m == "pag_16x16"}
    for method, settings in heads.items():
        assert list(settings["pag_layers"]) == ["input_blocks.14.1"] and settings["perturbation"] == "identity"
        check_heads_fit(model, settings["pag_layers"], settings["pag_heads"])  # 16 heads at 16x16
    with pytest.raises(ValueError, match="has 16 heads"):
        check_heads_fit(model, ["input_blocks.14.1"], [16])
    assert sorted(tuple(s["pag_heads"]) for s in heads.values()) == [(), (0,), (1,), (2,), (3,)]
    assert methods["tpg"]["perturbation"] == "shuffle" and list(methods["tpg"]["pag_layers"]) == PAPER
    assert sorted(methods[m]["apg_eta"] for m in ("pag_apg_eta0", "pag_apg_eta05")) == [0.0, 0.5]
    assert methods["pag_rescale07"]["guidance_rescale"] == 0.7
    for method in ("pag_apg_eta0", "pag_apg_eta05", "pag_rescale07"):  # PAG with only the one setting changed
        differing = {k for k, v in methods[method].items() if v != pag[k] and k != "out_dir"}
        assert differing == ({"apg_eta"} if "apg" in method else {"guidance_rescale"}), method


def test_beyond_pag_cond_cells_put_icg_against_pag_on_the_conditional_model():
    methods = beyond_pag_cells("beyond_pag_cond")
    assert sorted(methods) == ["baseline", "icg_w1", "icg_w3", "pag"]
    for settings in methods.values():
        assert settings["model_path"].endswith("256x256_diffusion.pt") and settings["class_cond"]
    assert methods["pag"]["pag_scale"] == 3.0 and list(methods["pag"]["pag_layers"]) == PAPER
    assert methods["pag"]["icg_scale"] == 0 and methods["baseline"]["pag_scale"] == 0
    assert {m: (s["icg_scale"], s["pag_scale"]) for m, s in methods.items() if m.startswith("icg")} == {
        "icg_w1": (1.0, 0.0), "icg_w3": (3.0, 0.0)}


def test_make_beyond_pag_runs_both_sweeps_like_the_other_targets():
    out = make_dry("beyond-pag", "GPUS=4", "NUM_SAMPLES=1000")
    for name in ("beyond_pag_uncond", "beyond_pag_cond"):
        assert (f"{ROOT_OK}.venv/bin/mpiexec -n 4 .venv/bin/python scripts/sweep.py configs/experiments/{name}.yaml "
                "--set num_samples=1000 --set batch_size=32") in out
    assert "srun .venv/bin/python scripts/sweep.py configs/experiments/beyond_pag_cond.yaml" in make_dry(
        "beyond-pag", "LAUNCHER=srun")


def test_compare_demo_config_is_the_same_comparison_at_demo_scale():
    sweep = load_sweep(str(ROOT / "configs" / "compare_demo.yaml"))
    cells = {cell.name.removeprefix("method-"): cell.settings.flat() for cell in expand(sweep)}
    assert list(cells) == ["baseline", "pag", "softpag_a050", "per_head", "tpg", "icg_w2", "pag_apg_eta0",
                           "pag_rescale07"]
    demo_layers = ["input_blocks.3.1", "input_blocks.5.1", "middle_block.1"]
    assert {s["model_path"] for s in cells.values()} == {"checkpoints/demo/adm_demo.pt"}
    assert {s["num_samples"] for s in cells.values()} == {100}
    assert cells["baseline"]["pag_scale"] == 0 and cells["icg_w2"]["pag_scale"] == 0
    assert cells["icg_w2"]["icg_scale"] == 2.0
    for method in ("pag", "softpag_a050", "tpg", "pag_apg_eta0", "pag_rescale07"):
        assert cells[method]["pag_scale"] == 2.0 and list(cells[method]["pag_layers"]) == demo_layers, method
    assert (cells["softpag_a050"]["perturbation"], cells["softpag_a050"]["soft_alpha"]) == ("soft", 0.5)
    assert cells["tpg"]["perturbation"] == "shuffle"
    assert (list(cells["per_head"]["pag_layers"]), list(cells["per_head"]["pag_heads"])) == (["input_blocks.5.1"], [1])
    assert cells["pag_apg_eta0"]["apg_eta"] == 0.0 and cells["pag_rescale07"]["guidance_rescale"] == 0.7
    assert sweep.ref_batch == "results/demo/reference.npz"  # make demo's held-out reference batch


def test_make_compare_demo_runs_the_demo_steps_on_its_config():
    lines = [line.strip() for line in make_dry("compare-demo").splitlines()]
    assert ".venv/bin/python scripts/demo.py prepare --config configs/compare_demo.yaml" in lines
    assert (".venv/bin/mpiexec --oversubscribe -n 2 .venv/bin/python scripts/sweep.py configs/compare_demo.yaml"
            in lines)
    assert lines[-1] == ".venv/bin/python scripts/demo.py finish --config configs/compare_demo.yaml --grid rows"


def test_compare_demo_finish_draws_one_row_of_the_same_seeds_per_cell(tmp_path, capsys):
    import numpy as np
    import yaml
    from PIL import Image

    from demo.pipeline import ROW_COUNT, finish

    config = yaml.safe_load((ROOT / "configs" / "compare_demo.yaml").read_text())
    config["out_dir"] = str(tmp_path / "compare")
    path = tmp_path / "compare_demo.yaml"
    path.write_text(yaml.safe_dump(config))
    cells = [cell.name for cell in expand(load_sweep(str(path)))]
    with pytest.raises(SystemExit, match="compare_demo.md is missing"):
        finish(config, path, "rows")
    for index, cell in enumerate(cells):  # each cell's samples one flat colour: 10 * index
        (tmp_path / "compare" / cell).mkdir(parents=True)
        np.savez(tmp_path / "compare" / cell / "samples_128x32x32x3.npz",
                 arr_0=np.full((128, 32, 32, 3), 10 * index, np.uint8), arr_1=np.zeros(128, np.int64))
    (tmp_path / "compare" / "table").mkdir()
    (tmp_path / "compare" / "table" / "compare_demo.md").write_text("| run | FID |\n")
    finish(config, path, "rows")
    assert "| run | FID |" in capsys.readouterr().out
    assert (tmp_path / "compare" / "table.md").read_text() == "| run | FID |\n"
    grid = np.asarray(Image.open(tmp_path / "compare" / "grid.png").convert("RGB"))
    row_height, zoom, label_width = (32 + 2 * 2) * 3, 3, 120
    assert grid.shape == (row_height * len(cells), label_width + (ROW_COUNT * 34 + 2) * zoom, 3)
    for index in range(len(cells)):  # the first image of row `index` is cell `index`'s
        assert (grid[index * row_height + 2 * zoom + 5, label_width + 2 * zoom + 5] == 10 * index).all()
