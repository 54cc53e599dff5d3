#!/usr/bin/env python
"""Draw the import graph of the ``sdconet`` package as a PNG, grouped and layered by subpackage.

    python tools/plot_module_graph.py --out docs/images/module_graph.png

Nodes are the package's modules, read with ``ast`` (nothing is imported); a package's
``__init__.py`` is the node ``__init__`` of its folder. An arrow A -> B means A imports from B.
Modules are grouped by the folder that holds them; every group is drawn above the groups it
imports from, and inside a group every module above the modules it imports. Import cycles,
between modules, between folders and between top-level subpackages, are printed.
networkx comes with torch, so this needs no extra dependency.
"""
import argparse
import ast
import os
from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO / "projects" / "SDCoNet" / "sdconet"

# Layout, in inches (the axes span the figure, one data unit = one inch).
CELL_W, LINE_H, TITLE_H, PAD, GROUP_GAP, ROW_GAP, PER_LINE = 1.3, 0.42, 0.38, 0.12, 0.35, 0.75, 4
TITLE_CHAR_W = 0.095  # width of a character of the bold group titles
# tab10 without its gray (used for the arrows inside a group), then darker shades.
COLOURS = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7] + [
    matplotlib.colors.to_rgb(c) for c in ("#3b3b98", "#6b4226", "#2f6b2f")]


def package_modules(package_dir: Path) -> Dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``package_dir``."""
    package_dir = Path(package_dir)
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: Dict[str, Path]) -> List[str]:
    """The package modules that module ``name`` imports from (relative or absolute imports), sorted
    so that the drawing does not change from run to run.

    ``from X import y`` names module ``X.y`` when that is a module, else module ``X``.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                target = f"{source}.{alias.name}"
                found.add(target if target in modules else source)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return sorted(m for m in found if m in modules and m != name)


def group_of(name: str, path: Path, root: str) -> str:
    """The folder holding the module, relative to the package ("modeling/transformer/");
    ``root/`` for the top-level modules; the package's own ``__init__`` (its public API) apart."""
    if name == root:
        return f"{root}/__init__.py"
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return f"{root}/" if package == root else package[len(root) + 1:].replace(".", "/") + "/"


def import_graph(package_dir: Path = PACKAGE_DIR) -> nx.DiGraph:
    """Modules as nodes (attributes ``group`` and ``label``), an edge for every intra-package import.

    Package ``__init__`` files that import nothing and that nobody imports are left out.
    """
    modules = package_modules(package_dir)
    root = Path(package_dir).name
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name, group=group_of(name, path, root), label=path.stem)
    for name, path in modules.items():
        graph.add_edges_from((name, target) for target in imported_modules(name, path, modules))
    idle = [n for n in graph if graph.nodes[n]["label"] == "__init__" and graph.degree(n) == 0]
    graph.remove_nodes_from(idle)
    return graph


def group_graph(graph: nx.DiGraph, top_level: bool = False) -> nx.DiGraph:
    """Groups as nodes, an edge where a module of one imports a module of the other.

    ``top_level`` merges nested folders into their top-level subpackage (modeling/transformer/
    into modeling/).
    """
    def key(node):
        group = graph.nodes[node]["group"]
        return group.split("/")[0] + "/" if top_level and group.count("/") > 1 else group

    groups = nx.DiGraph()
    groups.add_nodes_from(key(n) for n in graph)
    groups.add_edges_from((key(a), key(b)) for a, b in graph.edges if key(a) != key(b))
    return groups


def find_cycles(graph: nx.DiGraph) -> List[List[str]]:
    """Every import cycle, in import order, each starting at its smallest name."""
    cycles = []
    for cycle in nx.simple_cycles(graph):
        start = cycle.index(min(cycle))
        cycles.append(cycle[start:] + cycle[:start])
    return sorted(cycles)


def levels(graph: nx.DiGraph) -> Dict[str, int]:
    """Longest import chain below each node; nodes on a cycle share a level."""
    condensed = nx.condensation(graph)
    depth = {}
    for scc in reversed(list(nx.topological_sort(condensed))):
        depth[scc] = 1 + max((depth[s] for s in condensed.successors(scc)), default=-1)
    return {node: depth[condensed.graph["mapping"][node]] for node in graph}


def _lines_of(graph: nx.DiGraph, members: List[str]) -> List[List[str]]:
    """A group's modules in lines: importers above what they import, each module under its
    importers as far as it goes, modules no group member imports last; at most PER_LINE a line."""
    level = levels(graph.subgraph(members))
    x, lines = {}, []
    for depth in sorted(set(level.values()), reverse=True):
        def order(m):
            above = [x[p] for p in graph.predecessors(m) if p in x]
            return (not above, sum(above) / len(above) if above else 0.0, graph.nodes[m]["label"])
        same = sorted((m for m in members if level[m] == depth), key=order)
        for i in range(0, len(same), PER_LINE):
            lines.append(same[i:i + PER_LINE])
            x.update((m, j - len(lines[-1]) / 2) for j, m in enumerate(lines[-1]))
    return lines


def layout(graph: nx.DiGraph):
    """Node positions and group boxes: rows of groups by level (importers on top), ordered to
    keep arrows short (barycentre sweeps)."""
    groups = group_graph(graph)
    level = levels(groups)
    rows = [sorted(g for g in groups if level[g] == r) for r in range(max(level.values()) + 1)]
    members = {g: [n for n in graph if graph.nodes[n]["group"] == g] for g in groups}
    lines = {g: _lines_of(graph, members[g]) for g in groups}
    width = {g: max(max(map(len, lines[g])) * CELL_W, TITLE_CHAR_W * len(g)) + 2 * PAD for g in groups}
    height = {g: TITLE_H + len(lines[g]) * LINE_H + PAD for g in groups}

    def centres(row):
        x, out = 0.0, {}
        for g in row:
            out[g] = x + width[g] / 2
            x += width[g] + GROUP_GAP
        return {g: c - (x - GROUP_GAP) / 2 for g, c in out.items()}

    x = {}
    for r in range(len(rows)):
        x.update(centres(rows[r]))
    for _ in range(3):  # up, then down: order each row by the mean x of its neighbours
        for r in list(range(1, len(rows))) + list(range(len(rows) - 2, -1, -1)):
            def barycentre(g):
                near = [x[h] for h in nx.all_neighbors(groups, g) if abs(level[h] - r) == 1] or [x[g]]
                return sum(near) / len(near)
            rows[r].sort(key=barycentre)
            x.update(centres(rows[r]))

    pos, boxes, top = {}, {}, 0.0
    for row in reversed(rows):
        for g in row:
            left = x[g] - width[g] / 2
            boxes[g] = (left, top - height[g], width[g], height[g])
            for i, line in enumerate(lines[g]):
                offset = (width[g] - 2 * PAD - len(line) * CELL_W) / 2
                for j, node in enumerate(line):
                    pos[node] = (left + PAD + offset + (j + 0.5) * CELL_W, top - TITLE_H - (i + 0.5) * LINE_H)
        top -= max(height[g] for g in row) + ROW_GAP
    return pos, boxes


def draw(graph: nx.DiGraph, out: str) -> str:
    pos, boxes = layout(graph)
    colour = {g: COLOURS[i % len(COLOURS)] for i, g in enumerate(sorted(boxes))}
    x0 = min(b[0] for b in boxes.values()) - 0.3
    x1 = max(b[0] + b[2] for b in boxes.values()) + 0.3
    y0 = min(b[1] for b in boxes.values()) - 0.6
    y1 = max(b[1] + b[3] for b in boxes.values()) + 0.7
    fig = plt.figure(figsize=(x1 - x0, y1 - y0), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.axis("off")
    ax.text((x0 + x1) / 2, y1 - 0.35, "sdconet: who imports whom. Arrow: importer -> imported; grey inside a "
            "folder, else the colour of the imported folder. Every folder sits above the folders it imports.",
            ha="center", va="center", fontsize=12)
    for g, (left, bottom, w, h) in boxes.items():
        ax.add_patch(FancyBboxPatch((left, bottom), w, h, boxstyle="round,pad=0,rounding_size=0.08",
                                    facecolor=(*colour[g], 0.10), edgecolor=colour[g], linewidth=1.5, zorder=0))
        ax.text(left + w / 2, bottom + h - TITLE_H / 2 - 0.02, g, ha="center", va="center",
                fontsize=10.5, fontweight="bold", color=colour[g], zorder=3)
    labels = {}
    for node, (px, py) in pos.items():
        g = graph.nodes[node]["group"]
        labels[node] = ax.text(px, py, graph.nodes[node]["label"], ha="center", va="center", fontsize=9, zorder=2,
                               bbox=dict(boxstyle="round,pad=0.25", facecolor="white", edgecolor=colour[g],
                                         linewidth=0.8))
    fig.canvas.draw()  # places the label boxes, so the arrows below can end at their borders
    for a, b in graph.edges:
        same = graph.nodes[a]["group"] == graph.nodes[b]["group"]
        skips_lines = abs(pos[a][1] - pos[b][1]) > 1.5 * LINE_H
        ax.add_patch(FancyArrowPatch(pos[a], pos[b], arrowstyle="-|>", mutation_scale=10, shrinkA=1, shrinkB=1,
                                     patchA=labels[a].get_bbox_patch(), patchB=labels[b].get_bbox_patch(),
                                     connectionstyle=f"arc3,rad={0.15 if skips_lines or not same else 0.0}",
                                     linewidth=0.9, color="0.4" if same else colour[graph.nodes[b]["group"]],
                                     alpha=0.9 if same else 0.65, zorder=1))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def report_cycles(graph: nx.DiGraph) -> Dict[str, List[List[str]]]:
    cycles = {"modules": find_cycles(graph), "folders": find_cycles(group_graph(graph)),
              "top-level subpackages": find_cycles(group_graph(graph, top_level=True))}
    for what, found in cycles.items():
        shown = "; ".join(" -> ".join(c + c[:1]) for c in found) if found else "none"
        print(f"import cycles between {what}: {shown}")
    return cycles


def main(argv=None) -> nx.DiGraph:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", default=str(PACKAGE_DIR), help="the package folder to read")
    parser.add_argument("--out", default=str(REPO / "docs" / "images" / "module_graph.png"), help="PNG to write")
    args = parser.parse_args(argv)
    graph = import_graph(Path(args.package))
    print(f"{graph.number_of_nodes()} modules, {graph.number_of_edges()} imports")
    report_cycles(graph)
    print(draw(graph, args.out))
    return graph


if __name__ == "__main__":
    main()
