"""The reproduction configs and make targets: every experiment expands to the runs the paper needs."""

import subprocess
from pathlib import Path

import pytest
import torch

from guided_diffusion.script_util import create_model_from_flags
from sampling.model_configs import load_model_config
from sampling.sweep import expand, load_sweep
from pag import PAPER_LAYERS_256, resolve_layers

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
    return subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


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
