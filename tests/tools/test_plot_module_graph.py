"""tools/plot_module_graph.py reads the package's imports with ast and draws them layered by folder."""
import importlib.util
from pathlib import Path

import networkx as nx
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def load_tool():
    spec = importlib.util.spec_from_file_location("plot_module_graph", REPO / "tools" / "plot_module_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sdconet_graph_has_known_imports_no_cycles_and_is_drawn(tmp_path, capsys):
    tool = load_tool()
    png = tmp_path / "graph.png"
    graph = tool.main(["--out", str(png)])

    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 1000 and image.height > 600
    known = [
        ("sdconet.modeling.meta_arch", "sdconet.layers.onednn_linear"),  # from ..layers.onednn_linear import ...
        ("sdconet.modeling.transformer.dino_transformer", "sdconet.modeling.saliency"),
        ("sdconet.engine.train_loop", "sdconet.modeling.meta_arch"),
        ("sdconet.engine.trainer", "sdconet.evaluation"),  # from ..evaluation import ...: the package __init__
        ("sdconet.modeling", "sdconet.modeling.backbone"),  # from . import backbone as _backbone
        ("sdconet.inference.predictor", "sdconet.config"),
    ]
    missing = [edge for edge in known if not graph.has_edge(*edge)]
    assert not missing, missing
    assert graph.nodes["sdconet.modeling.transformer.encoder"]["group"] == "modeling/transformer/"
    assert graph.nodes["sdconet.config_checks"]["group"] == "sdconet/"
    # layers/ holds config-free building blocks: it imports nothing else from the package.
    layers = [n for n in graph if n.startswith("sdconet.layers")]
    assert layers and all(graph.nodes[b]["group"] == "layers/" for _, b in graph.out_edges(layers))
    # What docs/architecture.md states: no module cycle, top-level subpackages form a DAG.
    assert tool.find_cycles(graph) == []
    top = tool.group_graph(graph, top_level=True)
    assert nx.is_directed_acyclic_graph(top) and top.has_edge("engine/", "modeling/")
    assert not top.has_edge("modeling/", "engine/")
    assert "import cycles between modules: none" in capsys.readouterr().out


def test_relative_imports_and_cycles_of_a_small_package(tmp_path):
    tool = load_tool()
    files = {
        "toy/__init__.py": "from .a import f\n",
        "toy/a.py": "from .sub import b\n\ndef f():\n    return b\n",
        "toy/sub/__init__.py": '"""Imports nothing, imported by nobody: left out."""\n',
        "toy/sub/b.py": "import os\nimport toy.c\n\n\ndef g():\n    from ..a import f\n    return f\n",
        "toy/c.py": "from . import d\n",
        "toy/d.py": "import numpy\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    png = tmp_path / "toy.png"
    graph = tool.main(["--package", str(tmp_path / "toy"), "--out", str(png)])

    assert set(graph.edges) == {("toy", "toy.a"), ("toy.a", "toy.sub.b"), ("toy.sub.b", "toy.a"),
                                ("toy.sub.b", "toy.c"), ("toy.c", "toy.d")}
    assert tool.find_cycles(graph) == [["toy.a", "toy.sub.b"]]
    assert tool.find_cycles(tool.group_graph(graph)) == [["sub/", "toy/"]]
    assert png.stat().st_size > 0 and Image.open(png).format == "PNG"
