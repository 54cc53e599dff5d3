"""A reader thread that runs an iterator ahead of its consumer, a bounded number of items ahead.

Decoding GeoTIFF windows (GDAL) and scaling them (numpy) release the GIL, so a thread is enough
to keep them off the model's path: while the model runs on one batch of tiles, the thread reads
the next ones. The bound keeps the memory independent of the scene: at most ``depth`` items read
and not yet taken. An exception raised by the iterator is raised again in the consumer's thread,
with its traceback, after the items read before it.
"""
import queue
import threading

_ITEM, _END, _ERROR = "item", "end", "error"


class Prefetcher:
    """Iterate over ``iterable`` in a background thread, at most ``depth`` items ahead of the consumer.

    Use it as a context manager (or call :meth:`close`): leaving early stops the thread after the
    item it is reading and closes the iterator (so a generator's ``finally`` blocks run there).
    """

    def __init__(self, iterable, depth: int = 2, name: str = "reader"):
        if not (isinstance(depth, int) and depth >= 1):
            raise ValueError(f"depth (items read ahead) must be an integer >= 1, got {depth!r}")
        # A slot is taken before an item is read and given back when the consumer takes it, so
        # read-but-not-taken items (queued or being read) never exceed depth.
        self._slots = threading.Semaphore(depth)
        self._queue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._fill, args=(iter(iterable),), name=name, daemon=True)
        self._thread.start()

    def _fill(self, iterator):
        try:
            while True:
                self._slots.acquire()
                if self._stop.is_set():
                    break
                try:
                    item = next(iterator)
                except StopIteration:
                    self._queue.put((_END, None))
                    break
                self._queue.put((_ITEM, item))
        except BaseException as e:  # handed to the consumer, which raises it
            self._queue.put((_ERROR, e))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == _ITEM:
            self._slots.release()
            return value
        self._done = True
        self._thread.join()
        if kind == _ERROR:
            raise value
        raise StopIteration

    def close(self, timeout: float = 60.0):
        """Stop the thread (after the item it is reading) and wait for it."""
        self._done = True
        self._stop.set()
        self._slots.release()  # wake it if it waits for a slot
        self._thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
