"""guided_diffusion.logger: upstream's API, files, means, rank awareness."""

import csv
import json

import pytest

from guided_diffusion import logger


@pytest.fixture(autouse=True)
def fresh_logger(monkeypatch):
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    logger.reset()
    yield
    logger.reset()


def test_log_and_kvs_to_stdout_and_files(tmp_path, capsys):
    logger.configure(dir=str(tmp_path / "run"), format_strs=["stdout", "log", "csv", "json"])
    assert logger.get_dir() == str(tmp_path / "run")
    logger.log("sampling", 8, "images")
    logger.logkv("step", 1)
    logger.logkv_mean("loss", 1.0)
    logger.logkv_mean("loss", 3.0)
    assert logger.dumpkvs() == {"step": 1, "loss": 2.0}
    logger.logkv("step", 2)
    logger.logkv("lr", 0.5)  # a new key widens the csv
    logger.dumpkvs()
    logger.reset()

    out = capsys.readouterr().out
    assert "sampling 8 images" in out and "| loss" in out
    text = (tmp_path / "run" / "log.txt").read_text()
    assert "Logging to" in text and "sampling 8 images" in text and "| step | 1" in text
    rows = list(csv.DictReader(open(tmp_path / "run" / "progress.csv")))
    assert rows == [{"loss": "2.0", "step": "1", "lr": ""}, {"loss": "", "step": "2", "lr": "0.5"}]
    lines = [json.loads(x) for x in (tmp_path / "run" / "progress.json").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 2.0}, {"step": 2, "lr": 0.5}]


def test_dumpkvs_clears_means(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=[])
    logger.logkv_mean("x", 10)
    logger.dumpkvs()
    logger.logkv_mean("x", 2)
    assert logger.dumpkvs() == {"x": 2.0}
    assert logger.dumpkvs(sync=True) == {}  # one process: sync is a no-op


def test_other_ranks_are_silent_unless_asked(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    logger.configure(dir=str(tmp_path / "a"), format_strs=["stdout", "log"])
    logger.log("hidden")
    logger.reset()
    assert "hidden" not in capsys.readouterr().out
    assert not (tmp_path / "a").exists()

    logger.configure(dir=str(tmp_path / "b"), format_strs=["stdout", "log"], all_ranks=True)
    logger.log("shown")
    logger.reset()
    assert "[rank 1] shown" in capsys.readouterr().out
    assert "shown" in (tmp_path / "b" / "log.rank1.txt").read_text()


def test_default_dir_and_bad_format(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "env"))
    logger.configure(format_strs=["log"])
    assert logger.get_dir() == str(tmp_path / "env")
    with pytest.raises(ValueError, match="unknown log format"):
        logger.configure(dir=str(tmp_path), format_strs=["tensorboard"])


def test_log_before_configure_goes_to_stdout(capsys):
    logger.log("early")
    assert "early" in capsys.readouterr().out
    assert logger.get_dir() is None
