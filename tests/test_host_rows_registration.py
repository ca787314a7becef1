"""Host rows are page-locked piece by piece (ltri.offload.host_payloads._LockedPrefix): each byte once, in
contiguous pieces; the next piece registered on a background thread when the rows near the end of the locked
part; a failed background registration redone synchronously; a host short of memory refused in one sentence.

The CUDA calls are replaced by recorders here (the GPU test in test_captured_decode.py reads rows back through
real registrations); the threads are real."""

from __future__ import annotations

import ctypes
import mmap
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from support import resident_bytes

from ltri.offload import host_payloads
from ltri.offload.host_payloads import HostMemoryShort, _LockedPrefix

STEP, PAGE = 1000, 100


class Recorder:
    """Registrations as (address, size, thread name); fails the calls whose numbers are in failing."""

    def __init__(self, failing=(), gate: threading.Event | None = None):
        self.calls, self.unregistered, self.failing, self.gate = [], [], set(failing), gate

    def register(self, address, size):
        if self.gate is not None and threading.current_thread() is not threading.main_thread():
            self.gate.wait(5)
        self.calls.append((address, size, threading.current_thread().name))
        return 1 if len(self.calls) in self.failing else 0

    def unregister(self, address):
        self.unregistered.append(address)


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
    monkeypatch.setattr(host_payloads, "_LOCK_STEP_BYTES", STEP)
    monkeypatch.setattr(host_payloads, "_FIRST_LOCK_BYTES", STEP)
    monkeypatch.setattr(host_payloads, "_HUGE_PAGE", PAGE)
    monkeypatch.setattr(host_payloads, "available_host_bytes", lambda: None)


def assert_contiguous(locked: _LockedPrefix, base: int):
    offset = 0
    for address, size in locked.pieces:
        assert address == base + offset and size % PAGE == 0
        offset += size
    assert offset == locked.nbytes


def test_without_a_thread_pieces_are_registered_when_needed():
    recorder = Recorder()
    locked = _LockedPrefix(5000, recorder.register, recorder.unregister, executor=None)
    for needed in (10, 990, 1001, 2500, 2500, 7000):
        locked.extend(needed)
        assert locked.nbytes >= needed
    assert_contiguous(locked, 5000)
    assert [size for _, size, _ in recorder.calls] == [1000, 1000, 1000, 4000]  # at least STEP and a quarter
    assert all(name == threading.main_thread().name for _, _, name in recorder.calls)


def test_the_next_piece_is_registered_in_the_background_before_it_is_needed():
    recorder = Recorder()
    with ThreadPoolExecutor(1, thread_name_prefix="rows") as executor:
        locked = _LockedPrefix(0, recorder.register, recorder.unregister, executor)
        locked.extend(100)  # synchronous: nothing was locked
        assert locked._pending is None  # 900 bytes left: more than half a piece
        locked.extend(600)  # 400 left: the next piece starts in the background
        assert locked._pending is not None
        locked._pending[2].result()
        locked.extend(1500)  # needs the background piece: kept, nothing registered twice
        locked.extend(1900)
    assert [(address, size) for address, size, _ in recorder.calls] == [(0, 1000), (1000, 1000), (2000, 1000)]
    assert [name.startswith("rows") for _, _, name in recorder.calls] == [False, True, True]
    assert locked.nbytes == 2000 and locked._pending is not None  # the third piece is under way
    assert locked.release() == 3000  # the piece under way included
    assert recorder.unregistered == [0, 1000, 2000] and locked.nbytes == 0 and locked.pieces == []


def test_an_append_waits_for_a_background_registration_it_needs():
    gate = threading.Event()
    recorder = Recorder(gate=gate)
    with ThreadPoolExecutor(1) as executor:
        locked = _LockedPrefix(0, recorder.register, recorder.unregister, executor)
        locked.extend(700)
        assert locked._pending is not None and len(recorder.calls) == 1  # held at the gate
        threading.Timer(0.05, gate.set).start()
        locked.extend(1200)
    assert locked.nbytes == 2000 and [size for _, size, _ in recorder.calls] == [1000, 1000]
    assert_contiguous(locked, 0)


def test_a_failed_background_registration_is_redone_synchronously():
    recorder = Recorder(failing={2})  # the background call fails
    with ThreadPoolExecutor(1) as executor:
        locked = _LockedPrefix(0, recorder.register, recorder.unregister, executor)
        locked.extend(700)
        locked._pending[2].result()
        locked.extend(1100)
    assert [(address, size) for address, size, _ in recorder.calls[:3]] == [(0, 1000), (1000, 1000), (1000, 1000)]
    assert locked.pieces[:2] == [(0, 1000), (1000, 1000)]
    assert_contiguous(locked, 0)


def test_a_host_short_of_memory_gets_no_background_piece_and_one_sentence(monkeypatch):
    recorder = Recorder()
    with ThreadPoolExecutor(1) as executor:
        locked = _LockedPrefix(0, recorder.register, recorder.unregister, executor)
        locked.extend(700)
        locked._pending[2].result()
        monkeypatch.setattr(host_payloads, "available_host_bytes", lambda: host_payloads.HOST_MARGIN_BYTES + 10)
        locked.extend(1600)  # the background piece is there: no new one (the host cannot spare it)
        assert locked._pending is None
        with pytest.raises(HostMemoryShort, match="would leave the host under"):
            locked.extend(2500)
    assert locked.nbytes == 2000 and len(recorder.calls) == 2


def test_the_first_piece_is_small_and_the_next_one_starts_at_once(monkeypatch):
    monkeypatch.setattr(host_payloads, "_FIRST_LOCK_BYTES", 300)
    recorder = Recorder()
    with ThreadPoolExecutor(1) as executor:
        locked = _LockedPrefix(0, recorder.register, recorder.unregister, executor)
        locked.extend(10)
        locked._pending[2].result()
        locked.extend(1300)  # the background piece is all that is needed (and the next one starts)
    assert [(address, size) for address, size, _ in recorder.calls[:2]] == [(0, 300), (300, 1000)]
    assert locked.nbytes == 1300


def test_a_failed_synchronous_registration_is_host_memory_short():
    recorder = Recorder(failing={1})
    locked = _LockedPrefix(0, recorder.register, recorder.unregister, executor=None)
    with pytest.raises(HostMemoryShort, match="CUDA error 1"):
        locked.extend(10)
    assert locked.nbytes == 0 and locked.pieces == []


def test_pieces_stop_at_the_end_of_a_small_reserved_range():
    """A range shorter than a piece is locked whole, never past its end (CUDA refuses unmapped addresses), and no
    background piece starts once it is all locked."""
    recorder = Recorder()
    with ThreadPoolExecutor(1) as executor:
        locked = _LockedPrefix(0, recorder.register, recorder.unregister, executor, capacity=2500)
        locked.extend(10)
        if locked._pending is not None:
            locked._pending[2].result()
        locked.extend(2500)
        assert locked._pending is None
    assert locked.nbytes == 2500
    assert all(address + size <= 2500 for address, size, _ in recorder.calls)
    assert_contiguous(locked, 0)


def test_a_range_smaller_than_the_first_piece_is_one_registration():
    recorder = Recorder()
    locked = _LockedPrefix(0, recorder.register, recorder.unregister, executor=None, capacity=640)
    locked.extend(100)
    assert [(address, size) for address, size, _ in recorder.calls] == [(0, 640)]


def test_a_background_piece_is_faulted_in_before_it_is_registered(monkeypatch):
    monkeypatch.setattr(host_payloads, "_FIRST_LOCK_BYTES", 300)
    recorder, events = Recorder(), []

    def prefault(address, size):
        events.append(("prefault", address, size, threading.current_thread().name))

    def register(address, size):
        events.append(("register", address, size, threading.current_thread().name))
        return recorder.register(address, size)

    with ThreadPoolExecutor(1, thread_name_prefix="rows") as executor:
        locked = _LockedPrefix(0, register, recorder.unregister, executor, prefault=prefault)
        locked.extend(10)  # the first piece, synchronous: nothing to hide it, so no separate fault-in
        locked._pending[2].result()
        locked.extend(1300)
    first, background = events[0], events[1:3]
    assert first[0] == "register" and first[3] == "MainThread"
    assert [event[:3] for event in background] == [("prefault", 300, 1000), ("register", 300, 1000)]
    assert all(event[3].startswith("rows") for event in background)


@pytest.mark.parametrize("step", [None, 3 << 20])  # one call, or 3 MB a call (the last one shorter)
@pytest.mark.parametrize("populate_advice", [host_payloads._MADV_POPULATE_WRITE, 9999])  # 9999: the memset path
def test_prefaulted_pages_are_resident_zeros(monkeypatch, populate_advice, step):
    monkeypatch.setattr(host_payloads, "_MADV_POPULATE_WRITE", populate_advice)
    size = 32 * 2**20
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = (ctypes.c_char * size).from_buffer(region)
    before = resident_bytes()
    host_payloads.prefault_pages(ctypes.addressof(view), size, step)
    assert resident_bytes() - before > size * 3 // 4
    assert bytes(view[: 1 << 20]) == bytes(1 << 20) and bytes(view[-(1 << 20) :]) == bytes(1 << 20)
    del view
    region.close()


def test_prefault_setting_names_how_pieces_are_faulted_in():
    assert host_payloads.prefault_how("none") is None
    assert host_payloads.prefault_how("piece") is host_payloads.prefault_pages
    steps = host_payloads.prefault_how("steps")
    assert steps.func is host_payloads.prefault_pages and steps.keywords == {"step": host_payloads.PREFAULT_STEP_BYTES}
    with pytest.raises(ValueError, match="Unknown prefault"):
        host_payloads.prefault_how("sometimes")


def test_layers_sharing_several_threads_keep_each_ones_pieces_in_order():
    executor = host_payloads._registration_threads(4)
    assert executor._max_workers == 4 and host_payloads._registration_threads(4) is executor  # one pool a count
    recorders = [Recorder() for _ in range(6)]
    layers = [_LockedPrefix(i * 10**6, r.register, r.unregister, executor) for i, r in enumerate(recorders)]
    for needed in range(50, 12000, 350):  # every layer's rows grow together, as in a prefill
        for layer in layers:
            layer.extend(needed)
            assert layer.nbytes >= needed
    for i, (layer, recorder) in enumerate(zip(layers, recorders, strict=True)):
        registered = layer.pieces.copy()
        layer.release()
        end = i * 10**6  # each registration starts where the layer's previous one ended
        for address, size, _ in recorder.calls:
            assert address == end
            end += size
        calls = [(address, size) for address, size, _ in recorder.calls]
        assert calls[: len(registered)] == registered and len(calls) - len(registered) <= 1  # + one under way
        assert sorted(recorder.unregistered) == [address for address, _ in calls]  # release unregisters them all
        assert any(name.startswith("ltri-host-rows") for _, _, name in recorder.calls)  # the threads did register


def test_the_first_piece_can_start_in_the_background_before_the_first_append():
    gate = threading.Event()
    recorder = Recorder(gate=gate)
    with ThreadPoolExecutor(1, thread_name_prefix="rows") as executor:
        locked = _LockedPrefix(0, recorder.register, recorder.unregister, executor)
        locked.start()
        assert locked._pending is not None and locked.nbytes == 0  # under way, held at the gate
        locked.start()  # once
        gate.set()
        locked.extend(10)  # waits for it instead of registering on this thread
    assert [(address, size) for address, size, _ in recorder.calls] == [(0, 1000)]  # once, not again in extend
    assert recorder.calls[0][2].startswith("rows") and locked.pieces == [(0, 1000)]


def test_a_failed_early_first_piece_is_registered_when_needed():
    recorder = Recorder(failing={1})
    with ThreadPoolExecutor(1) as executor:
        locked = _LockedPrefix(0, recorder.register, recorder.unregister, executor)
        locked.start()
        locked._pending[2].result()
        locked.extend(10)
    assert [(address, size) for address, size, _ in recorder.calls[:2]] == [(0, 1000), (0, 1000)]
    assert locked.pieces[0] == (0, 1000)


def test_smaller_rows_lock_a_share_of_the_piece_sizes():
    """Rows a sixteenth of the tokens' keys and values (HostRows' lock_scale): pieces a sixteenth as large, whole
    pages still."""
    recorder = Recorder()
    locked = _LockedPrefix(0, recorder.register, recorder.unregister, executor=None, lock_scale=1 / 16)
    for needed in (10, 60, 130, 190):
        locked.extend(needed)
    assert_contiguous(locked, 0)
    assert [size for _, size, _ in recorder.calls] == [100, 100]  # 1000 / 16 = 62 bytes, rounded up to a page
