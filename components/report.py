"""CPU component: the per-case summary (report + publishing)."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Output

from .images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def summarize(case: Input[Dataset], edited: Input[Artifact], output_uri: str, case_id: str,
              summary: Output[Artifact], report: Output[HTML], report_md: Output[Markdown], metrics: Output[Metrics],
              edit_mask: Input[Artifact] | None = None, attention_map: Input[Artifact] | None = None) -> str:
    """Write the report (HTML + Markdown + metrics for the UI) and publish the outputs to ``output_uri``.

    Args:
        case: The prepared case.
        edited: The generate stage's folder.
        output_uri: Where the results go (local path, gs://, s3://); empty keeps them in the pipeline root only.
        case_id: Name of the case in batch runs; empty for a single edit.
        summary: Output folder with ``report.html`` and ``summary.json``.
        report: The report page, shown in the KFP UI.
        report_md: A short Markdown summary, shown in the KFP UI.
        metrics: Numeric figures of the summary (timings, mask fraction, ...).
        edit_mask: The mask folder (modes auto and mask).
        attention_map: The attention folder (mode auto).

    Returns:
        JSON with ``case_id``, ``output_uri`` (where the results were published) and ``summary``.
    """
    import json
    import shutil
    from pathlib import Path

    from editinfinity import runtime as rt
    from editinfinity.edit import stages

    mask_dir, attention_dir = rt.optional_dir(edit_mask), rt.optional_dir(attention_map)
    timings = rt.collect_timings(case, edited, edit_mask, attention_map)
    stages.summarize(summary.path, case_dir=case.path, generate_dir=edited.path, mask_dir=mask_dir,
                     attention_dir=attention_dir, timings=timings)
    data = json.loads((Path(summary.path) / "summary.json").read_text())
    shutil.copyfile(Path(summary.path) / "report.html", report.path)
    Path(report_md.path).write_text(rt.summary_markdown(data, output_uri=output_uri, case_id=case_id))
    for name, value in rt.summary_metrics(data, timings).items():
        metrics.log_metric(name, value)
    published = rt.publish_edit(output_uri, summary.path, edited=edited.path, mask=mask_dir, attention=attention_dir)
    return rt.case_result(case_id, published, data)
