"""`loraforge report RUN_DIR [--open]`: (re)write the run's self-contained report.html."""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "report", help="regenerate a run's report.html (config, data, loss curves, eval table, samples)",
        description="Write RUN_DIR/report.html from the files in the run directory: resolved config, hardware and "
        "library versions, data report, loss/eval/learning-rate curves, tokens/s, trainable parameters, and "
        "the eval table and answers when `loraforge eval` has been run. Self-contained: one HTML file with "
        "inline CSS and images, no JavaScript. Works on a run that is still training or was stopped.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `loraforge train`")
    p.add_argument("--open", action="store_true", help="open the report in the default web browser")
    p.set_defaults(handler=run)


def run(args) -> int:
    from loraforge.evaluate.report import write_report

    path = write_report(Path(args.run_dir))
    print(f"report: {path}")
    if args.open:
        import webbrowser

        if not webbrowser.open(path.resolve().as_uri()):
            print(f"could not start a browser here; open {path.resolve().as_uri()} yourself")
    return 0
