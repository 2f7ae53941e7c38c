"""`loraforge report RUN_DIR [--open]`: (re)write the run's self-contained report.html."""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "report", help="regenerate a run's report.html (config, data, loss curves, eval table, samples)",
        description="Write RUN_DIR/report.html from the files in the run directory: resolved config, hardware and "
        "library versions, data report, loss/eval/learning-rate curves, tokens/s, trainable parameters, and "
        "the eval table and answers when `loraforge eval` has been run. Self-contained: one HTML file with "
        "inline CSS and images, no JavaScript. Works at any time, mid-training too.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `loraforge train`")
    p.add_argument("--open", action="store_true", help="open the report in the default web browser")
    p.set_defaults(handler=run)


from loraforge.rundir import (CONFIG_FILE, DATA_REPORT_FILE, EVAL_FILE, METRICS_FILE, SUMMARY_FILE, TEMPLATE_FILE,
                              check_run_dir)

# The files the report is drawn from, besides config.yaml; any may be missing.
REPORT_INPUTS = (SUMMARY_FILE, METRICS_FILE, DATA_REPORT_FILE, TEMPLATE_FILE, EVAL_FILE)


def run(args) -> int:
    from loraforge.evaluate.report import write_report

    check_config_file(Path(args.run_dir))
    # No run-folder lock: the report only reads the run's files and replaces report.html whole, so it may be
    # rebuilt while training runs (the lock is for the writers of the run's own records).
    try:
        path = write_report(Path(args.run_dir))
    except (TypeError, KeyError, AttributeError, ValueError, IndexError) as e:
        culprit = malformed_input(Path(args.run_dir))
        if culprit is None:  # no single file explains it: a bug, shown as one
            raise
        from loraforge.errors import UserError

        raise UserError(f"{culprit}: unexpected content ({type(e).__name__}: {e}); it was edited or written by "
                        "another loraforge version. Restore it, or delete it, and rerun `loraforge report`") from e
    print(f"report: {path}")
    if args.open:
        import webbrowser

        if not webbrowser.open(path.resolve().as_uri()):
            print(f"could not start a browser here; open {path.resolve().as_uri()} yourself")
    return 0


def check_config_file(run_dir: Path) -> None:
    """config.yaml must at least be a YAML mapping (the report shows it as it is, any version)."""
    import yaml

    from loraforge.errors import UserError

    path = check_run_dir(run_dir) / CONFIG_FILE
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid YAML ({e}); restore the file the run wrote") from None
    if not isinstance(raw, (dict, type(None))):
        raise UserError(f"{path}: expected a mapping of sections, found {type(raw).__name__}; restore the file "
                        "the run wrote")


def malformed_input(run_dir: Path):
    """The one input file whose absence lets the report build (a copy of the run without it), else None."""
    import shutil
    import tempfile

    from loraforge.evaluate.report import build_report

    present = [name for name in REPORT_INPUTS if (run_dir / name).is_file()]
    for culprit in present:
        with tempfile.TemporaryDirectory(prefix="loraforge-report-") as tmp:
            copy = Path(tmp) / run_dir.name
            copy.mkdir()
            for name in [CONFIG_FILE, *present]:
                if name != culprit:
                    shutil.copyfile(run_dir / name, copy / name)
            try:
                build_report(copy)
            except Exception:  # noqa: BLE001 - another file is (also) at fault; try the next
                continue
            return run_dir / culprit
    return None
