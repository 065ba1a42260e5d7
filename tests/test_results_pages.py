"""``--markdown FILE`` of the measuring tools: the measured table as a results page with the date, the commit,
the machine and the command line that made it (the pages under docs/results/ are written, not retyped)."""
import datetime
import re

from tools import bench_metrics, bench_search, bench_train, learning_matrix


def _provenance(page: str, command: str) -> None:
    assert page.startswith("# ")
    assert f"- date: {datetime.date.today().isoformat()}" in page
    assert re.search(r"^- commit: ([0-9a-f]{7,}|unknown)", page, re.MULTILINE)
    assert re.search(r"^- machine: .+, \d+ cores", page, re.MULTILINE)
    assert f"- command: `{command}`" in page


def _table_rows(page: str) -> list[str]:
    return [line for line in page.splitlines() if line.startswith("| ") and not line.startswith("|--")]


def _page_of(tool, flags: list[str], tmp_path) -> str:
    """Run ``tool.main(flags + ["--markdown", FILE])``; the page it wrote, its provenance checked."""
    argv = [*flags, "--markdown", str(tmp_path / "page.md")]
    tool.main(argv)
    page = (tmp_path / "page.md").read_text()
    _provenance(page, f"python -m {tool.__name__} " + " ".join(argv))
    return page


def test_bench_search_markdown(tmp_path, capsys):
    page = _page_of(bench_search, ["--sizes", "500,1000", "--dim", "16", "--clusters", "5", "--intrinsic_dim", "4",
                                   "--queries", "20", "--timed", "3", "--nprobe", "2"], tmp_path)
    assert len(_table_rows(page)) == 1 + 4 and "| 1,000 | faiss IVF-Flat |" in page  # header, exact + faiss x 2


def test_bench_metrics_markdown(tmp_path, capsys):
    page = _page_of(bench_metrics, ["--queries", "40", "--gallery", "100", "--classes", "4", "--dim", "8",
                                    "--ref_queries", "5"], tmp_path)
    assert len(_table_rows(page)) == 2 and "| 40 × 100 (4, 8) | cpu" in page


def test_bench_train_markdown(tmp_path, capsys):
    page = _page_of(bench_train, ["--arch", "tiny", "--batch_size", "2", "--steps", "1", "--warmup", "0",
                                  "--configs", "ac"], tmp_path)
    rows = _table_rows(page)
    assert len(rows) == 3 and rows[1].startswith("| 2 | (a) reference-like") and "| 1.00× |" in rows[1]


def test_learning_matrix_markdown_from_made_up_cells(tmp_path):
    cell = {"benchmark": "issue_shapes", "seed": 0, "mAP@all": 0.584, "P@100": 0.44, "chance": 1 / 3,
            "mAP_x": 1.752, "P100_x": 1.32, "P100_x_max": 1.8, "triplet_acc": 0.88, "emb_spread": 0.925,
            "health_alarm": None, "seconds": 1302.0}
    cells = [cell, {**cell, "seed": 1, "mAP_x": 2.5}, {"benchmark": "lowcontrast_thick", "seed": 0,
                                                        "error": "train.py exited 2: boom"}]
    argv = ["--seeds", "0", "1", "--reference", "none", "--markdown", "page.md"]
    learning_matrix.write_markdown(tmp_path / "matrix.md", learning_matrix.format_table(cells),
                                   learning_matrix.verdict(cells)[0], "tiny", argv)
    page = (tmp_path / "matrix.md").read_text()
    _provenance(page, "python -m tools.learning_matrix " + " ".join(argv))
    assert "| issue_shapes | 0 | 0.584 (1.75x) | 0.440 (1.32x; 1.80x) | 0.333 | 0.88 | 0.925 | no | 21.7 |" in page
    assert "| lowcontrast_thick | 0 | FAILED: train.py exited 2: boom |" in page
    assert "2/3 cells finished" in page and "targets NOT met" in page
