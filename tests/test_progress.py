import io

from edgeprop.progress import Progress


def test_a_log_file_gets_plain_lines_not_redraws():
    log = io.StringIO()
    bar = Progress(1000, "train", stream=log)
    for i in range(1, 1001):
        bar.update(i, "block1")
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and "\r" not in log.getvalue()
    assert lines[0].startswith("train [###") and "1000/1000" in lines[0] and "block1" in lines[0]


def test_disabled_bar_writes_nothing():
    log = io.StringIO()
    bar = Progress(10, stream=log, enabled=False)
    bar.update(10)
    bar.close()
    assert log.getvalue() == ""
