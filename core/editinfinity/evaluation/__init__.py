"""Quality evaluation: PIE-Bench (PnP-Inversion's benchmark and metrics) for EditInfinity.

* ``piebench``: read ``mapping_file.json``, decode the run-length masks, entries -> cases (target words, modes).
* ``piebench_metrics``: background PSNR / MSE / SSIM / LPIPS, CLIP score, DINO structure distance.
* ``piebench_run``: ``run_piebench`` (edit every case once, resumable; score; write the outputs).
* ``piebench_report``: per-case CSV, per-type table (Markdown, HTML), thumbnail grids.
* ``toy``: a PIE-Bench-format data set made from the toy world.
* ``toy_judge``: the toy model judged without a model (``toyworld.analyse``): text to image, edits, held-out cases.
* ``toy_eval``: ``python -m editinfinity.evaluation.toy_eval``, the toy model's whole evaluation (JSON report).
* ``piebench_steps``: the same run as three steps over URIs (list, edit one, score all): the ``piebench`` pipeline's
  pods.
* ``cli``: ``editinfinity eval ...`` (alias ``bench``). Speed benchmarks are the repository's top-level ``bench/``.
"""
