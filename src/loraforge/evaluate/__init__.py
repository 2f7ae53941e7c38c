"""The evaluation stage: held-out loss, perplexity, task metrics, and the run report.

- `compare`: `evaluate_run(run_dir, EvalOptions)`, the base model vs the fine-tuned one -> eval.json.
- `metrics`: exact match, contains-reference, ROUGE-L and custom `module:function` metrics.
- `sql`: an execution-match metric for text-to-SQL runs.
- `report/`: `write_report(run_dir)` -> the self-contained report.html (charts, markup, sections, styles.css).

The loss and perplexity are training's own (`loraforge.train.loss`), so both stages measure the same way.
"""
