"""Memory follows the settings, not the input: the peak RSS of `loraforge data inspect` (and of training) on a
million rows or on one 20 MB row stays near what the same command needs for a ten-row file.

Each command runs in its own child process; a small Python wrapper runs it and reports
`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` (the child's peak resident memory), and stops it early should
it pass `KILL_AT` (a regression then fails the test instead of exhausting the machine). The datasets cache is
the test's own, so the JSON -> Arrow conversion is part of what is measured.

Measured on the 2-core box (2026-12-04, other jobs running), peak RSS and wall time:
- ten rows (the baseline): 435-438 MB, 7 s;
- 1,000,000 rows (`tokens` shape, 22 MB of JSONL): 669 MB (+234 MB: datasets' JSON -> Arrow conversion, the
  per-row counts at ~40 bytes a row, the memory-mapped Arrow file), 26 s; before this change 100,000 rows of
  the same kind took 1,249 MB (~8 KB a row: a million would need ~8 GB);
- one 20 MB row among ten short ones: 571-589 MB (+136-151 MB, mostly pyarrow parsing the 20 MB line; the
  tokenizer sees only the first 2 x 8 x (max_length + 1) characters), 12 s; before: 2,391 MB with this
  tokenizer (this test failed), ~5 GB with SmolLM2's;
- one training step on that file: 662 MB, against 652 MB on ten short rows with the same settings (~25 s each).
Margins: MILLION_ROWS_MARGIN_MB and BIG_ROW_MARGIN_MB below. Whole module: ~75 s.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

# What each input may add to the ten-row baseline (measured +154 MB and +250 MB, see above).
MILLION_ROWS_MARGIN_MB = 300
BIG_ROW_MARGIN_MB = 300
KILL_AT_MB = 4000

_WRAPPER = r"""
import resource, subprocess, sys, time
limit_kb = int(sys.argv[1]) * 1024
child = subprocess.Popen(sys.argv[2:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
killed = False
while child.poll() is None:
    try:
        with open(f"/proc/{child.pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    except (OSError, StopIteration):
        rss = 0
    if rss > limit_kb:
        child.kill()
        killed = True
    time.sleep(0.05)
out, err = child.communicate()
sys.stdout.write(out)
sys.stderr.write(err)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
sys.stderr.write(f"\nPEAK_RSS_MB {peak} KILLED {killed}\n")
sys.exit(child.returncode)
"""


def peak_rss(args: list[str], tmp_path: Path) -> tuple[int, subprocess.CompletedProcess, float]:
    """Run `python -m loraforge ARGS`; return its peak RSS in MB, the result, and the seconds it took."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _WRAPPER, str(KILL_AT_MB), sys.executable, "-m", "loraforge",
                             *args], capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    seconds = time.perf_counter() - started
    line = next(x for x in result.stderr.splitlines() if x.startswith("PEAK_RSS_MB"))
    assert line.endswith("KILLED False"), f"stopped at {KILL_AT_MB} MB: {result.stderr[-2000:]}"
    return int(line.split()[1]), result, seconds


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_model_dir) -> int:
    """Peak RSS of `data inspect` on ten rows: what the command needs whatever the input."""
    tmp = tmp_path_factory.mktemp("baseline")
    small = tmp / "small.jsonl"
    small.write_text("".join(json.dumps({"input_ids": [1, 5 + i, 2]}) + "\n" for i in range(10)))
    mb, result, seconds = peak_rss(["data", "inspect", "tiny", "--dataset", str(small), "--set", "data.train_on=all"],
                                   tmp)
    assert result.returncode == 0, result.stderr[-2000:]
    print(f"MEMORY baseline (10 rows): peak {mb} MB, {seconds:.1f} s")
    return mb


def test_a_million_rows(tmp_path, baseline):
    path = tmp_path / "million.jsonl"
    with open(path, "w") as f:
        for i in range(100_000):
            f.write("".join('{"input_ids":[1,%d,2]}\n' % (5 + (i + k) % 90) for k in range(10)))
    mb, result, seconds = peak_rss(["data", "inspect", "tiny", "--dataset", str(path), "--set", "data.train_on=all"],
                                   tmp_path)
    print(f"MEMORY 1,000,000 rows: peak {mb} MB (baseline {baseline} MB), {seconds:.1f} s")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rows: 950000 train, 50000 eval" in result.stdout  # every row was read (the recipe holds out 5%)
    assert mb <= baseline + MILLION_ROWS_MARGIN_MB, f"peak {mb} MB for a million rows, baseline {baseline} MB"


def big_row_file(tmp_path: Path) -> Path:
    """Ten short rows and one whose reply is 20 MB of words (about 4.5 million tokens)."""
    words = "the answer is a question what how why code data model train write list python sql table".split()
    reply = " ".join(words[(i * 7) % len(words)] for i in range(4_400_000))[:20_000_000]
    path = tmp_path / "big-row.jsonl"
    with open(path, "w") as f:
        for i in range(5):
            f.write(json.dumps({"input": f"Question {i}?", "output": f"Answer {i}."}) + "\n")
        f.write(json.dumps({"input": "Tell me everything.", "output": reply}) + "\n")
        for i in range(5, 10):
            f.write(json.dumps({"input": f"Question {i}?", "output": f"Answer {i}."}) + "\n")
    return path


def test_one_20_mb_row(tmp_path, baseline):
    path = big_row_file(tmp_path)
    mb, result, seconds = peak_rss(["data", "inspect", "tiny", "--dataset", str(path), "--out", str(tmp_path / "r")],
                                   tmp_path)
    print(f"MEMORY one 20 MB row: peak {mb} MB (baseline {baseline} MB), {seconds:.1f} s")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "r" / "data_report.json").read_text())
    assert report["over_max_length"] == 1 and report["truncated"] == 1
    assert report["tokens"]["total"]["max"] > 1_000_000  # its length, estimated from the part tokenized
    assert any("tokenized only as far as max_length needs" in w for w in report["warnings"])
    assert mb <= baseline + BIG_ROW_MARGIN_MB, f"peak {mb} MB for one 20 MB row, baseline {baseline} MB"


def test_training_on_a_20_mb_row(tmp_path):
    """One training step on the 20 MB row's file against one on ten short rows, with the same settings."""
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"input": f"Question {i}?", "output": f"Answer {i}." * 20}) + "\n"
                             for i in range(11)))
    train = ["train", "tiny", "--set", "train.max_steps=1", "--set", "samples=0", "--set", "train.tensorboard=false",
             "--set", "lora.r=4", "--set", "data.max_length=64", "--set", "train.micro_batch_size=2"]
    small_mb, result, seconds = peak_rss(train + ["--dataset", str(small), "--output-dir", str(tmp_path / "a")],
                                         tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    print(f"MEMORY training on ten short rows: peak {small_mb} MB, {seconds:.1f} s")
    mb, result, seconds = peak_rss(train + ["--dataset", str(big_row_file(tmp_path)), "--output-dir",
                                            str(tmp_path / "b")], tmp_path)
    print(f"MEMORY training on one 20 MB row: peak {mb} MB, {seconds:.1f} s")
    assert result.returncode == 0, result.stderr[-2000:]
    assert mb <= small_mb + BIG_ROW_MARGIN_MB, f"peak {mb} MB with a 20 MB row, {small_mb} MB without"
