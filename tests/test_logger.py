"""guided_diffusion.logger: upstream's API, files, means, rank awareness."""

import csv
import importlib.util
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
        logger.configure(dir=str(tmp_path), format_strs=["xml"])


def test_log_before_configure_goes_to_stdout(capsys):
    logger.log("early")
    assert "early" in capsys.readouterr().out
    assert logger.get_dir() is None


# --- upstream's other names ---------------------------------------------------------------------------


class Collect(logger.KVWriter):
    def __init__(self):
        self.tables = []

    def writekvs(self, kvs):
        self.tables.append(kvs)


def test_output_formats_and_make_output_format(tmp_path, capsys):
    stdout = logger.make_output_format("stdout", str(tmp_path / "d"))
    assert isinstance(stdout, logger.HumanOutputFormat) and isinstance(stdout, logger.SeqWriter)
    stdout.writeseq(["a", "b"])
    stdout.writekvs({"k": 1.5})
    assert "a b\n" in capsys.readouterr().out
    formats = [logger.make_output_format(f, str(tmp_path / "d"), log_suffix="-x") for f in ("log", "json", "csv")]
    assert [type(f) for f in formats] == [logger.HumanOutputFormat, logger.JSONOutputFormat,
                                          logger.CSVOutputFormat]
    assert all(isinstance(f, logger.KVWriter) for f in formats)
    collect = Collect()
    current = logger.Logger(str(tmp_path / "d"), formats + [collect], None)  # upstream's positional call
    logger.Logger.CURRENT = current
    assert logger.get_current() is current and logger.get_dir() == str(tmp_path / "d")
    logger.log("hello", 3)
    logger.record_tabular("x", 2)
    assert logger.dump_tabular() == {"x": 2} and collect.tables == [{"x": 2}]
    current.close()
    assert "hello 3" in (tmp_path / "d" / "log-x.txt").read_text()
    assert json.loads((tmp_path / "d" / "progress-x.json").read_text()) == {"x": 2}
    assert (tmp_path / "d" / "progress-x.csv").read_text().splitlines() == ["x", "2"]
    with pytest.raises(ValueError, match="unknown log format"):
        logger.make_output_format("xml", str(tmp_path))


def test_tensorboard_format(tmp_path):
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ImportError, match="pip install tensorboard"):
            logger.make_output_format("tensorboard", str(tmp_path))
        return
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = logger.make_output_format("tensorboard", str(tmp_path), log_suffix="-a")
    out.writekvs({"loss": 0.5, "name": "run"})
    out.writekvs({"loss": 0.25})
    out.close()
    events = EventAccumulator(str(tmp_path / "tb-a"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.5), (2, 0.25)]


def test_scoped_configure_restores_the_logger_before(tmp_path):
    outer = logger.configure(dir=str(tmp_path / "outer"), format_strs=["log"])
    with logger.scoped_configure(dir=str(tmp_path / "inner"), format_strs=["log"]) as inner:
        assert logger.get_current() is inner and logger.get_dir() == str(tmp_path / "inner")
        logger.log("inside")
    assert logger.get_current() is outer and inner.output_formats == []  # the inner one is closed
    logger.log("after")  # the outer logger was not closed
    logger.reset()
    assert "inside" in (tmp_path / "inner" / "log.txt").read_text()
    outer_text = (tmp_path / "outer" / "log.txt").read_text()
    assert "after" in outer_text and "inside" not in outer_text


def test_profile_kv_and_profile_add_up_seconds(tmp_path, monkeypatch):
    clock = iter([10.0, 10.5, 20.0, 20.25, 30.0, 31.0])
    monkeypatch.setattr(logger.time, "perf_counter", lambda: next(clock))
    logger.configure(dir=str(tmp_path), format_strs=[])
    with logger.profile_kv("io"):
        pass

    @logger.profile("io")
    def work(x):
        return 2 * x

    assert work(4) == 8 and work.__name__ == "work"
    with logger.profile_kv("other"):
        pass
    assert logger.dumpkvs() == {"wait_io": 0.75, "wait_other": 1.0}


class FakeComm:
    """An mpi4py-like communicator whose other rank logged ``theirs``."""

    def __init__(self, theirs):
        self.theirs = theirs

    def allgather(self, mine):
        return [mine, self.theirs]


def test_set_comm_and_mpi_weighted_mean(tmp_path):
    means = logger.mpi_weighted_mean(FakeComm({"loss": (4.0, 3), "tag": ("b", 1)}),
                                     {"loss": (0.0, 1), "tag": ("a", 1), "only_here": (5, 1)})
    assert means == {"loss": 3.0, "tag": "a", "only_here": 5.0}
    logger.configure(dir=str(tmp_path), format_strs=[])
    logger.set_comm(FakeComm({"loss": (1.0, 1)}))
    logger.logkv_mean("loss", 2.0)
    logger.logkv_mean("loss", 4.0)
    assert logger.dumpkvs() == {"loss": (3.0 * 2 + 1.0) / 3}  # weighted by the number of values
    logger.set_comm(None)
    logger.logkv("loss", 2.0)
    assert logger.dumpkvs() == {"loss": 2.0}


def test_rank_without_mpi_import(monkeypatch):
    assert logger.get_rank_without_mpi_import() == 0
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    assert logger.get_rank_without_mpi_import() == 3
