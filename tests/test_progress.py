"""Progress as log lines (no terminal: cron, Slurm, Kubernetes logs): each state said once."""
import logging

from pipeline.progress import Progress

log = logging.getLogger("pipeline.test_progress")


def test_the_final_state_is_said_once(caplog):
    """The last shard's line and the closing line said the same thing twice, differing only in the rate (issue 26,
    item 6)."""
    with caplog.at_level(logging.INFO, logger="pipeline"):
        with Progress(log, "embed", total=100, unit="img") as p:
            p.update(50)
            p.status("shards 1/2")
            p._line()
            p.update(50)
            p.status("shards 2/2")
            p._line()  # the last shard's line: 100/100
    said = [r.getMessage() for r in caplog.records if r.name == log.name]
    assert len(said) == 2 and said[0].startswith("embed: 50/100 img (50%)") and said[1].startswith("embed: 100/100 img")


def test_a_state_not_yet_said_is_said_at_close(caplog):
    with caplog.at_level(logging.INFO, logger="pipeline"):
        with Progress(log, "index", total=10, unit="vec") as p:
            p.update(10)
    assert [r.getMessage().split(",")[0] for r in caplog.records if r.name == log.name] == ["index: 10/10 vec (100%)"]
