"""The reader thread (sdconet.inference.prefetch.Prefetcher) that overlaps reading with the model.

The consumer must see the items in order, the thread must stay at most ``depth`` items ahead
(and really read ahead), stop when the consumer leaves, and hand its errors to the consumer's
thread; fed by ``scene_stream``, a file that breaks mid-scene is named and the next scene goes on.
"""
import os
import threading
import time
import traceback
import warnings

import numpy as np
import pytest
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from sdconet.inference.prefetch import Prefetcher
from sdconet.inference.scene_reader import SceneEnd, SceneFailed, SceneStart, TileBatch, open_scene, scene_stream


def wait_for(condition, what, timeout=30.0):
    """Poll until ``condition()`` holds (a synchronisation, not a timing check)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


@pytest.mark.parametrize("depth", [1, 3])
def test_items_come_in_order_and_the_reader_stays_at_most_depth_ahead(depth):
    started, threads = [], set()

    def source(n=12):
        for i in range(n):
            started.append(i)
            threads.add(threading.current_thread().name)
            yield i

    seen = []
    with Prefetcher(source(), depth=depth, name="test-reader") as items:
        for i in items:
            seen.append(i)
            # The reader reads ahead while the consumer holds item i...
            wait_for(lambda: len(started) >= min(12, i + 1 + depth), f"the reader to reach item {i + depth}")
            # ...but with i + 1 items taken, at most depth more are started (queued or being read).
            assert len(started) <= i + 1 + depth
    assert seen == list(range(12))
    assert threads == {"test-reader"}


def test_an_error_in_the_reader_is_raised_in_the_consumer_after_the_items_before_it():
    def source():
        yield "a"
        yield "b"
        raise OSError(f"Cannot read window rows 0:128, cols 0:128 of image file /data/scene.tif "
                      f"(in thread {threading.current_thread().name})")

    seen = []
    with pytest.raises(OSError, match=r"image file /data/scene\.tif \(in thread scene-reader\)") as e:
        for item in Prefetcher(source(), depth=2, name="scene-reader"):
            seen.append(item)
    assert seen == ["a", "b"]
    assert threading.current_thread() is threading.main_thread()
    assert any(frame.name == "source" for frame in traceback.extract_tb(e.value.__traceback__))


def test_leaving_early_stops_the_thread_and_closes_the_source():
    closed = threading.Event()

    def source():
        try:
            for i in range(1000):
                yield i
        finally:
            closed.set()

    with Prefetcher(source(), depth=2, name="early-reader") as items:
        assert next(items) == 0
    assert closed.is_set()
    assert not any(t.name == "early-reader" for t in threading.enumerate())


def write_tiled(path, data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="GTiff", height=data.shape[1], width=data.shape[2], count=3,
                           dtype="uint8", tiled=True, blockxsize=128, blockysize=128) as dst:
            dst.write(data)
    return str(path)


def test_a_file_broken_mid_scene_is_named_and_the_next_scene_goes_on(tmp_path):
    rng = np.random.default_rng(0)
    broken = write_tiled(tmp_path / "broken.tif", rng.integers(1, 256, (3, 512, 512)).astype(np.uint8))
    with open(broken, "r+b") as f:  # keep the header and the first blocks only
        f.truncate(os.path.getsize(broken) // 2)
    good = write_tiled(tmp_path / "good.tif", rng.integers(1, 256, (3, 256, 256)).astype(np.uint8))
    stream = scene_stream([(0, broken), (1, good)], open_scene, 128, 0, 2, 64)
    items = list(Prefetcher(stream, depth=2, name="scene-reader"))
    kinds = [type(item) for item in items]
    failed = items[kinds.index(SceneFailed)]
    assert kinds[0] is SceneStart and kinds[1] is TileBatch  # the first windows were read...
    assert failed.index == 0 and failed.path == broken and f"of image file {broken}" in str(failed.error)
    assert "Cannot read window rows" in str(failed.error)  # ...then a window past the cut failed
    rest = kinds[kinds.index(SceneFailed) + 1:]
    assert rest == [SceneStart, TileBatch, TileBatch, SceneEnd] and items[-1].index == 1
