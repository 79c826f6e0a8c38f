"""Draw a compiled pipeline's task graph (Graphviz DOT, rendered to PNG/SVG when `dot` is installed).

    python -m pipelines.graph build/pipelines/edit-gke-l4.yaml --out docs/pipeline.png
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import yaml


def _tasks(dag: dict, components: dict, prefix: str = "") -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    """(node id, label, kind) and (from, to) edges of a DAG, flattening sub-DAGs (conditions, loops)."""
    nodes, edges = [], []
    for name, task in dag.get("tasks", {}).items():
        node = prefix + name
        comp = components.get(task["componentRef"]["name"], {})
        if "dag" in comp:
            sub_nodes, sub_edges = _tasks(comp["dag"], components, prefix=node + "/")
            label = name.replace("for-loop-", "for each case ")
            cond = task.get("triggerPolicy", {}).get("condition", "")
            # Elif/Else conditions are "!(earlier) && this"; the last clause names the branch.
            last = cond.split("&&")[-1].strip()
            if last.startswith("!"):
                label = "else"
            elif last:  # e.g. inputs.parameter_values['pipelinechannel--mode'] == 'auto'
                label = "if " + last.split("pipelinechannel--")[-1].replace("']", "").replace("'", "")
            nodes.append((node, label, "group"))
            nodes += sub_nodes
            edges += sub_edges + [(node, n) for n, _, _ in sub_nodes if n.count("/") == node.count("/") + 1]
        else:
            nodes.append((node, name, "task"))
        for dep in task.get("dependentTasks", []):
            edges.append((prefix + dep, node))
    return nodes, edges


def to_dot(spec: dict, gpu_executors: set[str]) -> str:
    nodes, edges = _tasks(spec["root"]["dag"], spec["components"])
    lines = ["digraph pipeline {", '  rankdir=LR; node [shape=box, style="rounded,filled", fontname=Helvetica];']
    for node, label, kind in nodes:
        base = node.rsplit("/", 1)[-1]
        colour = "#dddddd" if kind == "group" else "#ffd8a8" if base in gpu_executors else "#d0ebff"
        suffix = " (GPU)" if base in gpu_executors else ""
        lines.append(f'  "{node}" [label="{label}{suffix}", fillcolor="{colour}"];')
    for a, b in edges:
        lines.append(f'  "{a}" -> "{b}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("compiled", help="compiled pipeline YAML")
    ap.add_argument("--out", required=True, help="output .dot, .png or .svg")
    args = ap.parse_args()
    docs = list(yaml.safe_load_all(Path(args.compiled).read_text()))
    spec = docs[0]
    gpu = set()
    for name, ex in spec["deploymentSpec"]["executors"].items():
        if ex.get("container", {}).get("resources", {}).get("accelerator"):
            gpu.add(name.removeprefix("exec-"))
    dot = to_dot(spec, gpu)
    out = Path(args.out)
    if out.suffix == ".dot" or shutil.which("dot") is None:
        out.with_suffix(".dot").write_text(dot)
        return
    subprocess.run(["dot", f"-T{out.suffix[1:]}", "-o", str(out)], input=dot, text=True, check=True)


if __name__ == "__main__":
    main()
