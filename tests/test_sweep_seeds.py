"""A sweep's seeds (``seeds: N``, ``seeds: [...]``, a list as base's ``seed:`` or a grid axis ``seed``): one run per
cell and seed, ``<cell>__seed-<s>``, each its own out_dir; the table gets them merged into mean ± std."""

from pathlib import Path

import pytest
import yaml

from conftest import TINY_MODEL_FLAGS
from evaluations.evaluator import RESULT_FORMAT
from guided_diffusion import logger
from sampling import sweep, sweep_evaluation
from sampling.settings import SampleConfigError


@pytest.fixture(autouse=True)
def _close_logs():
    yield
    logger.reset()


def write_sweep(path, ckpt, base_extra=None, grid=None, **extra):
    doc = {"out_dir": str(path.parent / "out"),
           "base": dict(TINY_MODEL_FLAGS, model_path=str(ckpt), num_samples=4, shard_size=2, batch_size=2,
                        timestep_respacing="4", **(base_extra or {})),
           "grid": grid if grid is not None else {"pag_scale": [0, 2]}}
    doc.update(extra)
    path.write_text(yaml.safe_dump(doc))
    return path


def test_seeds_count_runs_every_cell_once_per_seed(ckpt, tmp_path):
    cfg = sweep.load_sweep(write_sweep(tmp_path / "s.yaml", ckpt, base_extra={"seed": 3}, seeds=3))
    cells = sweep.expand(cfg)
    assert [c.name for c in cells] == [f"pag_scale-{p}__seed-{s}" for p in (0, 2) for s in (3, 4, 5)]
    assert [c.settings.flat()["seed"] for c in cells] == [3, 4, 5, 3, 4, 5]
    assert [c.settings.flat()["pag_scale"] for c in cells] == [0.0] * 3 + [2.0] * 3
    assert len({c.out_dir for c in cells}) == 6
    assert cells[4].out_dir == str(tmp_path / "out" / "pag_scale-2__seed-4")


@pytest.mark.parametrize("where", ["seeds", "base", "grid"])
def test_seed_lists_in_each_place(where, ckpt, tmp_path):
    kwargs = {"seeds": dict(seeds=[7, 1]), "base": dict(base_extra={"seed": [7, 1]}),
              "grid": dict(grid={"pag_scale": [0], "seed": [7, 1]})}[where]
    cells = sweep.expand(sweep.load_sweep(write_sweep(tmp_path / "s.yaml", ckpt, **kwargs)))
    assert [c.name for c in cells if c.name.startswith("pag_scale-0")] == ["pag_scale-0__seed-7", "pag_scale-0__seed-1"]
    assert [c.settings.flat()["seed"] for c in cells][:2] == [7, 1]


def test_no_seeds_keeps_cell_names(ckpt, tmp_path):
    cells = sweep.expand(sweep.load_sweep(write_sweep(tmp_path / "s.yaml", ckpt)))
    assert [c.name for c in cells] == ["pag_scale-0", "pag_scale-2"]


BAD = {
    "zero seeds": (dict(seeds=0), "seeds must be a number of seeds >= 1"),
    "repeated seeds": (dict(seeds=[1, 1]), "list of distinct seeds"),
    "negative seed": (dict(seeds=[-1]), "seeds >= 0"),
    "scalar grid seed": (dict(grid={"seed": 3}), "grid.seed must be a list of distinct seeds >= 0"),
    "two places": (dict(seeds=2, base_extra={"seed": [0, 1]}), "given by both seeds and base.seed"),
    "a bundle sets seed": (dict(seeds=2, grid={"s": [{"name": "a", "seed": 5}]}), "cell s-a sets seed"),
    "table value": (dict(table={"minimum": "yes"}), "table must be a mapping of minimum"),
    "table key": (dict(table={"minimun": True}), "table must be a mapping of minimum"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_seed_configs(case, ckpt, tmp_path):
    kwargs, message = BAD[case]
    with pytest.raises(SampleConfigError) as info:
        sweep.expand(sweep.load_sweep(write_sweep(tmp_path / "s.yaml", ckpt, **kwargs)))
    assert message in str(info.value)


def test_table_gets_the_seed_runs_and_merges_them(ckpt, tmp_path):
    """The evaluation hand-off with the real table code: FID 10, 12, 17 over three seeds -> 13.00 ± 3.61 (std with
    ddof=1: sqrt(26 / 2)), minimum 10.00; the cell without PAG 20, 20, 20 -> 20.00 ± 0.00."""
    (tmp_path / "ref.npz").write_bytes(b"reference")
    cfg = sweep.load_sweep(write_sweep(tmp_path / "s.yaml", ckpt, seeds=3, ref_batch=str(tmp_path / "ref.npz"),
                                       table={"minimum": True}, name="seeds"))
    cells = sweep.expand(cfg)
    fids = {"pag_scale-2__seed-0": 10.0, "pag_scale-2__seed-1": 12.0, "pag_scale-2__seed-2": 17.0}
    for cell in cells:
        Path(cell.out_dir).mkdir(parents=True)
        (Path(cell.out_dir) / "samples_4x32x32x3.npz").write_bytes(cell.name.encode())

    def evaluate(ref_path, sample_path, json_path=None, dist=None):
        name = Path(sample_path).parent.name
        return {"format": RESULT_FORMAT, "fid": fids.get(name, 20.0), "inception_score": 1.0, "sfid": 1.0,
                "precision": 0.5, "recall": 0.5, "sample": {"num_images": 4}}

    tables = sweep_evaluation.after_runs(cells, cfg, evaluate_fn=evaluate)
    rows = {r["run"]: r for r in tables["seeds"]["rows"]}
    assert sorted(rows) == ["pag_scale-0", "pag_scale-2"] and rows["pag_scale-2"]["seeds"] == 3
    md = (tmp_path / "out" / "table" / "seeds.md").read_text()
    assert "13.00 \u00b1 3.61" in md and "20.00 \u00b1 0.00" in md and "| FID min |" in md and "| 10.00 |" in md
    assert all((Path(c.out_dir) / "eval.json").is_file() for c in cells)  # each seed's run evaluated
