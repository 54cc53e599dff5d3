#!/usr/bin/env python
"""Install detectron2 v0.6 on a modern stack (torch 2.x, numpy 2, Pillow >= 10, Python 3.11).

detectron2 is not on PyPI under its own name and its git repository may be unreachable.
``pb1-detectron2==0.6`` on PyPI is upstream v0.6's Python sources without the C++ ones.
This script:

1. keeps an already working detectron2 (compiled ``_C``, or this script's own install at the
   current patch-set version) untouched;
2. otherwise fetches the pinned sdist from the package index and checks its sha256;
3. applies the visible patch set :data:`PATCHES` below to the unpacked sources (no compiled
   ops, Pillow / numpy / Python 3.11 / torch 2 fixes, a ``_C`` stand-in that raises a clear
   error when a compiled op is used);
4. installs it with ``pip install --no-build-isolation`` under the upstream name ``detectron2``.

Run it with the interpreter of the target environment: ``.venv/bin/python tools/install_detectron2.py``.
Nothing here is applied at run time: the patched files are what gets installed.
"""
import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import urllib.parse
import urllib.request

SDIST_NAME = "pb1-detectron2"
SDIST_VERSION = "0.6"
SDIST_FILE = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
# Bump when PATCHES change, so an older patched install gets replaced.
PATCH_SET_VERSION = "sdconet-1"

C_STANDIN = textwrap.dedent(
    f'''\
    """Stand-in for detectron2's compiled extension, which this install does not build.

    Installed by SDCoNet's tools/install_detectron2.py (patch set {PATCH_SET_VERSION}). Nothing
    SDCoNet uses needs a compiled op; using one raises a RuntimeError that says so.
    """
    PATCH_SET_VERSION = "{PATCH_SET_VERSION}"


    def get_compiler_version():
        return "not built: pure-Python install (SDCoNet tools/install_detectron2.py)"


    def get_cuda_version():
        return "not built: pure-Python install (SDCoNet tools/install_detectron2.py)"


    def has_cuda():
        return False


    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def _not_built(*args, **kwargs):
            raise RuntimeError(
                f"detectron2 compiled op '{{name}}' is not built in this install (pure-Python "
                "detectron2 from SDCoNet's tools/install_detectron2.py). Use a code path without "
                "compiled ops (e.g. COCOEvaluator(use_fast_impl=False)) or install a detectron2 "
                "built with its C++/CUDA extension."
            )

        return _not_built
    '''
)

# (file, old text, new text, why). Each old text must occur in the file; all occurrences are
# replaced. A mismatch stops the install with the file name, so a changed sdist cannot be
# patched silently.
PATCHES = [
    ("setup.py", 'name="pb1-detectron2"', 'name="detectron2"',
     "install under the upstream name so `pip check` and packages requiring detectron2 see it"),
    ("setup.py", "ext_modules=get_extensions()", "ext_modules=[]",
     "the sdist lacks detectron2/layers/csrc; build no compiled ops"),
    ("setup.py", '        "black==21.4b2",\n', "",
     "a formatter used only to pretty-print LazyConfig.save output; the pin does not install on 3.11"),
    ("setup.py", '            "panopticapi @ https://github.com/cocodataset/panopticapi/archive/master.zip",\n', "",
     "direct-URL extra that current pip rejects and that needs the network"),
    ("detectron2/data/transforms/transform.py", "Image.LINEAR", "Image.BILINEAR",
     "Pillow 10 removed the LINEAR alias (fixed upstream after v0.6)"),
    ("detectron2/evaluation/pascal_voc_evaluation.py", "astype(np.bool)", "astype(bool)",
     "numpy 1.24 removed np.bool"),
    ("detectron2/evaluation/sem_seg_evaluation.py", "dtype=np.int)", "dtype=int)",
     "numpy 1.24 removed np.int"),
    ("detectron2/evaluation/sem_seg_evaluation.py", "np.float)", "float)",
     "numpy 1.24 removed np.float"),
    ("detectron2/structures/masks.py", "np.bool)", "bool)",
     "numpy 1.24 removed np.bool"),
    ("detectron2/model_zoo/model_zoo.py", "import pkg_resources\n", "",
     "current setuptools no longer ships pkg_resources"),
    ("detectron2/model_zoo/model_zoo.py",
     'cfg_file = pkg_resources.resource_filename(\n        "detectron2.model_zoo", os.path.join("configs", config_path)\n    )',
     'cfg_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", config_path)',
     "same lookup without pkg_resources"),
    ("detectron2/data/common.py", "self._rng.sample(self._fallback_candidates, k=1)",
     "self._rng.sample(sorted(self._fallback_candidates), k=1)",
     "random.sample() rejects sets since Python 3.11 (crashed loaders whose mapper skips a sample)"),
    ("detectron2/engine/hooks.py", "torch.optim.lr_scheduler._LRScheduler", "torch.optim.lr_scheduler.LRScheduler",
     "torch 2 schedulers derive from LRScheduler; their state was silently not checkpointed"),
    ("detectron2/export/__init__.py", "from .api import *\n",
     "try:  # caffe2 export needs caffe2, gone from torch 2\n    from .api import *\nexcept ImportError:\n    pass\n",
     "keep `import detectron2.export` (TracingAdapter, TorchScript) working without caffe2"),
]


def log(msg):
    print(f"[install_detectron2] {msg}", flush=True)


def probe_installed(python):
    """Return (status, detail) of the detectron2 importable by ``python``.

    status: "compiled" (a real build), "ours" (this patch set), "other" (stale or broken), "missing".
    """
    code = textwrap.dedent(
        """
        import importlib.util, sys
        if importlib.util.find_spec("detectron2") is None:
            print("missing"); sys.exit(0)
        try:
            import detectron2.modeling, detectron2.engine, detectron2.evaluation, detectron2.data
            import detectron2._C as C
        except Exception as e:
            print("other", repr(e)); sys.exit(0)
        origin = getattr(C, "__file__", "") or ""
        if origin.endswith((".so", ".pyd")):
            print("compiled", origin)
        elif getattr(C, "PATCH_SET_VERSION", None) == %r:
            print("ours", origin)
        else:
            print("other", origin)
        """ % PATCH_SET_VERSION
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        return "other", out.stderr.strip()[-500:]
    status, _, detail = out.stdout.strip().partition(" ")
    return status, detail


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def index_url():
    """The primary package index pip is configured with (PyPI by default)."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                         capture_output=True, text=True)
    url = os.environ.get("PIP_INDEX_URL") or (out.stdout.strip() if out.returncode == 0 else "")
    return (url or "https://pypi.org/simple").rstrip("/")


def fetch_sdist(dest):
    """Download the pinned sdist into ``dest`` and return its path.

    ``pip download`` is tried first. Current pip refuses this sdist's metadata (a direct-URL
    extra), so the fallback reads the file's address from the package index's simple page
    (PEP 503), the same place pip looks.
    """
    cmd = [sys.executable, "-m", "pip", "download", f"{SDIST_NAME}=={SDIST_VERSION}", "--no-deps",
           "--no-binary", ":all:", "--no-build-isolation", "-d", dest]
    result = subprocess.run(cmd, capture_output=True, text=True)
    path = os.path.join(dest, SDIST_FILE)
    if result.returncode == 0 and os.path.exists(path):
        return path
    log("pip download refused the sdist (its metadata has a direct-URL extra); "
        "reading its address from the package index instead")
    page_url = f"{index_url()}/{SDIST_NAME}/"
    try:
        with urllib.request.urlopen(page_url, timeout=60) as r:
            page = r.read().decode("utf-8", "replace")
        match = re.search(r'href="([^"]*%s[^"]*)"' % re.escape(SDIST_FILE), page)
        if not match:
            raise RuntimeError(f"{SDIST_FILE} is not listed on {page_url}")
        url = urllib.parse.urljoin(page_url, match.group(1).replace("&amp;", "&")).split("#")[0]
        urllib.request.urlretrieve(url, path)
    except Exception as e:  # network, index or listing problem: say what and where
        raise SystemExit(f"[install_detectron2] could not download {SDIST_FILE} from {page_url}: {e}")
    return path


def apply_patches(src):
    """Apply :data:`PATCHES` and write the ``_C`` stand-in into the unpacked sources."""
    for rel, old, new, why in PATCHES:
        path = os.path.join(src, rel)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if old not in text:
            raise SystemExit(f"[install_detectron2] patch does not apply to {rel}: text not found: {old[:60]!r}")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text.replace(old, new))
        log(f"patched {rel}: {why}")
    with open(os.path.join(src, "detectron2", "_C.py"), "w", encoding="utf-8") as f:
        f.write(C_STANDIN)
    log("wrote detectron2/_C.py: stand-in that names any compiled op used")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="reinstall even if a working detectron2 is found")
    parser.add_argument("--sdist", help="use this local pb1-detectron2-0.6.tar.gz instead of downloading")
    args = parser.parse_args(argv)

    status, detail = probe_installed(sys.executable)
    if status == "compiled" and not args.force:
        log(f"a compiled detectron2 works ({detail}); keeping it")
        return 0
    if status == "ours" and not args.force:
        log(f"detectron2 with patch set {PATCH_SET_VERSION} is installed and imports; nothing to do")
        return 0
    log(f"detectron2 status: {status} {detail}".rstrip() + "; installing the patched v0.6")

    try:
        import torch  # noqa: F401  (detectron2's setup.py imports torch)
    except ImportError:
        raise SystemExit("[install_detectron2] torch is not installed in this environment; install "
                         "torch==2.14.1 torchvision==0.29.1 first (make setup does)")

    with tempfile.TemporaryDirectory(prefix="d2-install-") as work:
        sdist = args.sdist or fetch_sdist(work)
        digest = sha256_of(sdist)
        if digest != SDIST_SHA256:
            raise SystemExit(f"[install_detectron2] sha256 mismatch for {sdist}: got {digest}, expected {SDIST_SHA256}")
        log(f"sha256 verified: {digest}")
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        src = os.path.join(work, f"{SDIST_NAME}-{SDIST_VERSION}")
        shutil.rmtree(os.path.join(src, "pb1_detectron2.egg-info"), ignore_errors=True)
        apply_patches(src)
        cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-cache-dir", src]
        log("running: " + " ".join(cmd[:-1]) + " <patched sources>")
        subprocess.run(cmd, check=True)

    status, detail = probe_installed(sys.executable)
    if status not in ("ours", "compiled"):
        raise SystemExit(f"[install_detectron2] detectron2 installed but does not import cleanly: {detail}")
    log("detectron2 installed and imports (modeling, engine, evaluation, data)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
