"""The data stage: sources -> shapes -> templates -> tokenize (labels masked) -> report.

Public API: `bundled_path()`, `prepare(data_cfg, tokenizer, log=print) -> PreparedData`,
`write_data_report(prepared, run_dir)`, and `templates.get_template(name, tokenizer)`.
"""
from loraforge.data.prepare import PreparedData, prepare
from loraforge.data.report import write_data_report
from loraforge.data.sources import bundled_path
from loraforge.data.templates import ChatTemplate, Segment, get_template, template_from_record

__all__ = [
    "ChatTemplate", "PreparedData", "Segment", "bundled_path", "get_template", "prepare",
    "template_from_record", "write_data_report",
]
