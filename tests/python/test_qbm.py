# SPDX-License-Identifier: LGPL-2.1-or-later
"""The Python module qbm, judged by QEMU: extents against qemu-nbd's dirty
map on seeded random images, every edit followed by a clean qemu-img check
and QEMU's view, errors with their errno, callback exceptions that stop
the C operation and leave the output or image as it was, locks released by
the context manager, and misuse of closed handles.

Run by tests/python/run.py (suite `python`), which puts the built module on
sys.path; QBM_TEST_SEED replays a seed."""
import errno
import os
import random
import re
import shutil
import sys
import threading

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import qbmtest  # noqa: E402
from qbmtest import (KiB, MiB, LoopDevice, dirty_map, file_hash,  # noqa
                     merge_extents, qemu_bitmaps, qemu_image_end, qemu_img,
                     qemu_img_check, qemu_img_compare, qemu_img_create,
                     qemu_io, run)

import qbm  # noqa: E402

SEED = int(os.environ.get("QBM_TEST_SEED", random.randrange(1 << 31)))


def setup_module():
    # run.py prints it too; this shows with a failure's captured output.
    print("seed %d (QBM_TEST_SEED=%d replays it)" % (SEED, SEED))


@pytest.fixture
def d(tmp_path):
    return tmp_path


def create(d, name, size=64 * MiB, opts=None, backing=None):
    return qemu_img_create(str(d / name), size, opts=opts,
                           backing=backing)


def aligned(extents, gran, size):
    """What a bitmap of granularity gran records for byte extents."""
    out = []
    for off, length in extents:
        s = off // gran * gran
        e = min(-(-(off + length) // gran) * gran, size)
        out.append((s, e - s))
    return merge_extents(out)


def qemu_view(path):
    """{name: (granularity, enabled, in_use)} as qemu-img info says."""
    return {n: (g, "auto" in f, "in-use" in f)
            for n, (g, f) in qemu_bitmaps(path).items()}


def qbm_view(img):
    return {b.name: (b.granularity, b.enabled, b.in_use)
            for b in img.bitmaps}


def judge(path, names=None):
    """The image is clean for qemu-img check, QEMU lists the bitmaps qbm
    lists, and QEMU's dirty map of each equals qbm's extents."""
    qemu_img_check(path)
    with qbm.open(path) as img:
        view = qbm_view(img)
        ours = {b.name: list(img.extents(b.name)) for b in img.bitmaps}
        dirty = {b.name: b.dirty_bytes for b in img.bitmaps}
    assert qemu_view(path) == view
    for name in (names if names is not None else ours):
        assert dirty_map(path, name) == ours[name], name
        assert dirty[name] == sum(length for _, length in ours[name])
    return ours


# ---- extents ----------------------------------------------------------------

@pytest.mark.parametrize("round_", range(4))
def test_extents_equal_qemu_random(d, round_):
    """Bitmaps written by QEMU (qemu-io writes while they are enabled): qbm
    reads the same extents as qemu-nbd exports."""
    rng = random.Random(SEED * 8 + round_)
    cluster = rng.choice([4 * KiB, 64 * KiB, 512 * KiB])
    size = rng.randrange(8, 200) * MiB + rng.choice([0, 512, 12345 * 512])
    path = create(d, "r.qcow2", size, "cluster_size=%d" % cluster)
    grans = {}
    for i in range(rng.randrange(1, 4)):
        g = 1 << rng.randrange(9, 21)
        grans["b%d" % i] = g
        qemu_img("bitmap", "--add", "-g", str(g), path, "b%d" % i)
    writes = []
    cmds = []
    for _ in range(rng.randrange(1, 40)):
        off = rng.randrange(0, size // 512) * 512
        length = min(rng.randrange(1, 300) * 512, size - off)
        writes.append((off, length))
        cmds.append("write %d %d" % (off, length))
    qemu_io(path, *cmds)
    with qbm.open(path) as img:
        for name, g in grans.items():
            ext = list(img.extents(name))
            assert ext == aligned(writes, g, size)
            assert ext == dirty_map(path, name)


def test_extents_many_batches(d):
    """More extents than one batch of the iterator (4096): the walk
    resumes where it stopped, and a partly consumed iterator is fine."""
    size = 16 * MiB
    path = create(d, "m.qcow2", size)
    with qbm.open(path, write=True) as img:
        img.add("fine", granularity=512)
        for off in range(0, 10000 * 1024, 1024):
            img.mark("fine", off, 512)
        img.commit()
        it = img.extents("fine")
        head = [next(it) for _ in range(5)]
        ext = list(img.extents("fine"))
        assert head == ext[:5]
        assert next(it) == ext[5]
    assert len(ext) == 10000
    assert ext == [(o, 512) for o in range(0, 10000 * 1024, 1024)]
    assert ext == dirty_map(path, "fine")


# ---- edits ------------------------------------------------------------------

def test_edits_then_qemu_agrees(d):
    rng = random.Random(SEED)
    size = 64 * MiB
    path = create(d, "e.qcow2", size)
    qemu_io(path, "write 0 1M", "write 20M 256k")
    with qbm.open(path, write=True) as img:
        img.add("a", granularity=65536)
        img.add("b", granularity=4096, enabled=False)
        img.add("c")
        assert img.bitmap("c").granularity == 65536
        marks = [(rng.randrange(0, size // 512) * 512, rng.randrange(1, 99)
                  * 512) for _ in range(20)]
        for off, length in marks:
            img.mark("a", off, min(length, size - off))
        assert list(img.extents("a")) == aligned(
            [(o, min(n, size - o)) for o, n in marks], 65536, size)
        img.commit()
    ours = judge(path)
    assert ours["b"] == [] and ours["c"] == []

    with qbm.open(path, write=True) as img:
        img.merge("b", "a")
        img.populate("c")
        img.rename("a", "a2")
        img.disable("a2")
        img.enable("b")
        img.commit()
    ours2 = judge(path)
    assert ours2["b"] == ours["a"]
    assert ours2["c"] == [(0, MiB), (20 * MiB, 256 * KiB)]
    assert qemu_view(path)["a2"] == (65536, False, False)

    with qbm.open(path, write=True) as img:
        img.clear("b")
        img.remove("c")
        img.commit()
        assert [b.name for b in img.bitmaps] == ["a2", "b"]
    assert judge(path)["b"] == []


def test_merge_from_other_image(d):
    size = 32 * MiB
    src = create(d, "src.qcow2", size)
    dst = create(d, "dst.qcow2", size)
    qemu_img("bitmap", "--add", "-g", "4096", src, "s1")
    qemu_img("bitmap", "--add", src, "s2")
    qemu_io(src, "write 4096 4096", "write 10M 1M")
    with qbm.open(src) as s, qbm.open(dst, write=True) as img:
        img.add("t", granularity=65536)
        img.merge("t", "s1", "s2", source_image=s)
        img.commit()
    assert judge(dst)["t"] == [(0, 65536), (10 * MiB, MiB)]


def test_uncommitted_edits_are_dropped(d):
    path = create(d, "u.qcow2")
    before = open(path, "rb").read()
    with qbm.open(path, write=True) as img:
        img.add("x")
        img.mark("x", 0, MiB)
        assert [b.name for b in img.bitmaps] == ["x"]
    assert open(path, "rb").read() == before


# ---- errors -----------------------------------------------------------------

def test_errors_carry_errno(d):
    path = create(d, "x.qcow2")
    missing = str(d / "missing.qcow2")
    with pytest.raises(qbm.Error) as e:
        qbm.open(missing)
    assert isinstance(e.value, OSError)
    assert e.value.errno == errno.ENOENT
    assert e.value.filename == missing
    assert e.value.message and e.value.message == e.value.strerror

    with qbm.open(path, write=True) as img:
        img.add("a")
        with pytest.raises(qbm.Error) as e:
            img.add("a")
        assert e.value.errno == errno.EEXIST
        with pytest.raises(qbm.Error) as e:
            img.remove("nope")
        assert e.value.errno == errno.ENOENT
        assert "nope" in e.value.message
        with pytest.raises(qbm.Error) as e:
            img.add("g", granularity=1000)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OverflowError):
            img.mark("a", -512, 512)
        with pytest.raises(qbm.Error) as e:
            list(img.extents("nope"))
        assert e.value.errno == errno.ENOENT
        # Another writer is refused while this one holds the image.
        with pytest.raises(qbm.Error) as e:
            qbm.open(path, write=True)
        assert e.value.errno == errno.EBUSY
    with qbm.open(path) as img:
        with pytest.raises(qbm.Error) as e:
            img.add("b")
        assert e.value.errno != 0
    not_qcow2 = d / "raw.img"
    not_qcow2.write_bytes(b"\0" * 65536)
    with pytest.raises(qbm.Error) as e:
        qbm.open(str(not_qcow2))
    assert e.value.errno == errno.EINVAL
    with pytest.raises(TypeError):
        qbm.open(path, write=True).add(42)
    with pytest.raises(ValueError):
        qbm.restore([path], str(d / "o"), format="vmdk")
    with pytest.raises(TypeError):
        qbm.restore(path, str(d / "o"))
    with pytest.raises(TypeError):
        qbm.consolidate(path, str(d / "o"))


# ---- callbacks ----------------------------------------------------------------

class Stop(Exception):
    pass


def stopper(after):
    calls = []

    def progress(done, total):
        calls.append((done, total))
        if len(calls) >= after:
            raise Stop("stop at %d" % done)
    return progress, calls


def backup_images(d):
    size = 64 * MiB
    full = create(d, "full.qcow2", size)
    qemu_io(full, "write -P 1 0 8M", "write -P 2 30M 2M")
    inc = create(d, "inc.qcow2", size)
    qemu_io(inc, "write -P 3 1M 3M", "write -P 4 40M 64k")
    return full, inc


def test_restore_callback_exception(d):
    full, inc = backup_images(d)
    out = d / "out.raw"
    progress, calls = stopper(1)
    with pytest.raises(Stop):
        qbm.restore([full, inc], str(out), progress=progress)
    assert len(calls) == 1 and not out.exists()
    # An existing output stays as it was.
    out.write_bytes(b"old contents")
    progress, calls = stopper(2)
    with pytest.raises(Stop):
        qbm.restore([full, inc], str(out), format="qcow2", progress=progress)
    assert out.read_bytes() == b"old contents"
    assert sorted(os.listdir(d)) == ["full.qcow2", "inc.qcow2", "out.raw"]
    seen = []
    qbm.restore([full, inc], str(out), progress=lambda a, b: seen.append(a))
    assert seen and seen == sorted(seen)
    expect = str(d / "expect.qcow2")
    shutil.copy(full, expect)
    qemu_io(expect, "write -P 3 1M 3M", "write -P 4 40M 64k")
    assert qemu_img_compare("-f", "raw", "-F", "qcow2", str(out), expect)


def test_extract_callback_exception(d):
    path = create(d, "vm.qcow2")
    qemu_img("bitmap", "--add", path, "ck")
    qemu_io(path, "write -P 7 0 4M", "write -P 8 9M 1M")
    out = d / "inc.qcow2"
    progress, calls = stopper(1)
    with pytest.raises(Stop):
        qbm.extract(path, str(out), "ck", progress=progress)
    assert not out.exists() and len(calls) == 1
    qbm.extract(path, str(out), "ck")
    qemu_img_check(str(out))
    assert qemu_img_compare(str(out), path)


def test_consolidate_callback_exception(d):
    full, inc = backup_images(d)
    before = str(d / "before.qcow2")
    shutil.copy(full, before)
    progress, calls = stopper(1)
    with pytest.raises(Stop):
        qbm.consolidate(full, [inc], progress=progress)
    assert len(calls) == 1
    qemu_img_check(full)
    assert qemu_img_compare(full, before)
    qbm.consolidate(full, [inc])
    qemu_img_check(full)
    assert not qemu_img_compare(full, before)


def test_keyboard_interrupt_style_exceptions_propagate(d):
    full, inc = backup_images(d)

    def progress(done, total):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        qbm.restore([full, inc], str(d / "o.raw"), progress=progress)
    assert not (d / "o.raw").exists()


# ---- handles ------------------------------------------------------------------

def test_context_manager_releases_locks(d):
    path = create(d, "l.qcow2")
    with qbm.open(path, write=True) as img:
        assert not img.closed
        # QEMU sees the lock too.
        p = run(["qemu-io", "-f", "qcow2", "-c", "quit", path], ok=None)
        assert p.returncode != 0
    assert img.closed
    with qbm.open(path, write=True) as again:
        again.add("x")
        again.commit()
    qemu_io(path, "write 0 4k")
    # An exception inside the block closes it too.
    with pytest.raises(Stop):
        with qbm.open(path, write=True) as img:
            raise Stop()
    assert img.closed
    qbm.open(path, write=True).close()
    # force_share opens without locks while a writer holds the image.
    with qbm.open(path, write=True):
        with qbm.open(path, force_share=True) as ro:
            assert [b.name for b in ro.bitmaps] == ["x"]


def test_misuse_after_close_raises(d):
    path = create(d, "c.qcow2")
    qemu_img("bitmap", "--add", path, "b")
    img = qbm.open(path, write=True)
    bm = img.bitmaps[0]
    it = img.extents("b")
    img.close()
    img.close()
    for call in (lambda: img.bitmaps, lambda: img.virtual_size,
                 lambda: img.add("x"), lambda: img.commit(),
                 lambda: img.check(), lambda: list(it),
                 lambda: img.extents("b"), lambda: bm.dirty_bytes,
                 lambda: img.merge("b", "b"), lambda: img.__enter__()):
        with pytest.raises(ValueError):
            call()
    assert "closed" in repr(img)

    chain = qbm.open_chain(path)
    layer = chain.layers[0]
    chain.close()
    with pytest.raises(ValueError):
        layer.bitmaps
    with pytest.raises(ValueError):
        len(chain)
    with pytest.raises(ValueError):
        chain.check()
    # A closed image as a merge source is refused, not followed.
    src = qbm.open(path)
    src.close()
    with qbm.open(path, write=True) as img:
        with pytest.raises(ValueError):
            img.merge("b", "b", source_image=src)
        with pytest.raises(TypeError):
            img.populate("b", layer="not an image")


def test_handle_busy_in_another_thread(d):
    """A handle in a call (its GIL released) refuses a second call from
    another thread with RuntimeError instead of racing the library; every
    call that runs gives the right answer."""
    path = create(d, "t.qcow2", 256 * MiB)
    with qbm.open(path, write=True) as img:
        img.add("b", granularity=512)
        for off in range(0, 256 * MiB, 8 * KiB):
            img.mark("b", off, 512)
        img.commit()
    want = 256 * MiB // (8 * KiB) * 512
    counts = {"ok": 0, "busy": 0}
    errors = []
    with qbm.open(path) as img:
        bm = img.bitmaps[0]

        def worker():
            for _ in range(10):
                try:
                    if bm.dirty_bytes != want:
                        errors.append("wrong count")
                    counts["ok"] += 1
                except RuntimeError:
                    counts["busy"] += 1
                except Exception as e:  # noqa: B902
                    errors.append(repr(e))
        t = threading.Thread(target=worker)
        t.start()
        while t.is_alive():
            try:
                if [b.name for b in img.bitmaps] != ["b"]:
                    errors.append("wrong list")
            except RuntimeError:
                counts["busy"] += 1
        t.join()
        assert errors == []
        assert counts["ok"] + counts["busy"] >= 10
        assert bm.dirty_bytes == want


# ---- chains -----------------------------------------------------------------

def test_chain_extents_and_rules(d):
    size = 32 * MiB
    base = create(d, "base.qcow2", size)
    qemu_img("bitmap", "--add", base, "ck")
    qemu_img("bitmap", "--add", base, "old")
    qemu_io(base, "write 0 64k")
    mid = create(d, "mid.qcow2", size, backing="base.qcow2")
    top = create(d, "top.qcow2", size, backing="mid.qcow2")
    qemu_img("bitmap", "--add", top, "ck")
    qemu_img("bitmap", "--add", top, "new")
    qemu_img("bitmap", "--disable", top, "new")
    qemu_io(top, "write 1M 64k")
    with qbm.open_chain(top) as chain:
        assert len(chain) == 3
        assert [os.path.basename(f) for f in chain.filenames] == [
            "top.qcow2", "mid.qcow2", "base.qcow2"]
        layers = chain.layers
        assert [b.name for b in layers[0].bitmaps] == ["ck", "new"]
        assert chain.extents("ck") == merge_extents(
            dirty_map(top, "ck") + dirty_map(base, "ck"))
        findings = {(f.rule, f.bitmap, f.layer) for f in chain.check()}
        assert findings == {
            (qbm.CHAIN_GAP, "ck", 1),
            (qbm.CHAIN_NOT_IN_TOP, "old", 0),
            (qbm.CHAIN_NOT_IN_TOP, "old", 1),
            (qbm.CHAIN_DISABLED, "new", 0),
        }
        with pytest.raises(qbm.Error) as e:
            chain.extents("none")
        assert e.value.errno == errno.ENOENT
    # Repair the gap as libvirt's rules want it: a copy in mid with mid's
    # own clusters, then no finding for ck.
    with qbm.open(mid, write=True) as m:
        m.add("ck")
        m.populate("ck")
        m.commit()
    qemu_img_check(mid)
    with qbm.open_chain(top) as chain:
        assert not [f for f in chain.check() if f.bitmap == "ck"]


# ---- check and repair -------------------------------------------------------

def test_check_and_repair(d):
    path = create(d, "r.qcow2")
    qemu_img("bitmap", "--add", path, "ck")
    qemu_io(path, "write 0 64k")
    run(["qemu-io", "-f", "qcow2", "-c", "write 1M 64k", "-c", "abort",
         path], ok=None)
    assert qemu_view(path)["ck"][2]
    with qbm.open(path) as img:
        problems = img.check()
        assert [p.kind for p in problems if
                p.kind == qbm.PROBLEM_BITMAP] == [qbm.PROBLEM_BITMAP]
        assert "ck" in problems[0].message or any(
            "ck" in p.message for p in problems)
        assert not img.bitmap("ck").consistent
    with qbm.open(path, write=True) as img:
        img.repair(in_use="dirty", leaks=True)
        assert img.check() == []
    judge(path)
    with qbm.open(path) as img:
        assert img.bitmap("ck").dirty_bytes == img.virtual_size
    with pytest.raises(ValueError):
        qbm.open(path).repair(in_use="maybe")


# ---- copy and carrying bitmaps ----------------------------------------------

def test_copy_between_images(d):
    size = 32 * MiB
    src = create(d, "src.qcow2", size)
    dst = create(d, "dst.qcow2", size)
    qemu_img("bitmap", "--add", "-g", "4096", src, "a")
    qemu_img("bitmap", "--add", src, "b")
    qemu_io(src, "write 8k 4k", "write 3M 1M")
    qemu_img("bitmap", "--disable", src, "b")
    with qbm.open(src) as s, qbm.open(dst, write=True) as img:
        assert img.copy(s) == [(qbm.COPY_COPIED, "a", 4096),
                               (qbm.COPY_COPIED, "b", 65536)]
        img.commit()
    ours = judge(dst)
    assert qemu_view(dst) == qemu_view(src)
    assert ours["a"] == dirty_map(src, "a")
    qemu_io(src, "write 20M 4k")
    with qbm.open(src) as s, qbm.open(dst, write=True) as img:
        with pytest.raises(qbm.Error) as e:
            img.copy(s, ["a"])
        assert e.value.errno == errno.EEXIST
    with qbm.open(src) as s, qbm.open(dst, write=True) as img:
        assert img.copy(s, ["a"], merge=True) == [
            (qbm.COPY_MERGED, "a", 4096)]
        img.commit()
    assert judge(dst)["a"] == dirty_map(src, "a")


def test_carry_commit(d):
    size = 32 * MiB
    base = create(d, "base.qcow2", size)
    top = create(d, "top.qcow2", size, backing="base.qcow2")
    qemu_img("bitmap", "--add", top, "ck")
    qemu_io(top, "write 1M 64k", "write 5M 4k")
    with qbm.open(base, write=True) as img:
        actions = img.carry_commit(top)
        assert [(a, b) for a, b, _ in actions] == [(qbm.CARRY_COPIED, "ck")]
        assert os.path.basename(actions[0][2]) == "top.qcow2"
        img.commit()
    assert judge(base)["ck"] == dirty_map(top, "ck")
    assert qemu_view(base)["ck"] == (65536, True, False)


def test_carry_snapshot(d):
    size = 32 * MiB
    base = create(d, "base.qcow2", size)
    qemu_img("bitmap", "--add", base, "ck")
    qemu_io(base, "write 0 64k")
    top = create(d, "top.qcow2", size, backing="base.qcow2")
    qemu_io(top, "write 2M 64k")
    actions = qbm.carry_snapshot(base, top, disable_base=True)
    assert [(a, b) for a, b, _ in actions] == [
        (qbm.CARRY_SNAPSHOT_ADDED, "ck"), (qbm.CARRY_SNAPSHOT_TOP_DONE, None),
        (qbm.CARRY_SNAPSHOT_DISABLED, "ck"),
        (qbm.CARRY_SNAPSHOT_BASE_DONE, None)]
    assert judge(top)["ck"] == [(2 * MiB, 64 * KiB)]
    judge(base)
    assert qemu_view(base)["ck"] == (65536, False, False)
    assert qemu_view(top)["ck"] == (65536, True, False)
    with qbm.open_chain(top) as chain:
        assert chain.check() == [(qbm.CHAIN_DISABLED, "ck", 1, 1)]
    # Not TOP's backing file: refused, naming both.
    other = create(d, "other.qcow2", size)
    with pytest.raises(qbm.Error) as e:
        qbm.carry_snapshot(other, top)
    assert e.value.errno == errno.EINVAL
    assert "backing file" in e.value.message


def test_commit_plan_then_commit(d):
    """The plan of a fresh add on a QEMU-made image writes nothing, keeps
    the edits, and says where the image will end: QEMU's image end offset
    after the commit. A worst-case plan needs at least as much."""
    path = create(d, "a.qcow2", 1024 * MiB)
    qemu_io(path, "write 0 1M", "write 600M 64k")
    end = qemu_image_end(path)
    with qbm.open(path, write=True) as img:
        assert img.capacity == 0
        assert img.end_offset() == end
        img.add("ck", granularity=512)
        img.mark("ck", 3 * MiB, 64 * KiB)
        before = file_hash(path), os.path.getsize(path)
        plan = img.commit_plan()
        worst = img.commit_plan(worst_case=True)
        assert (file_hash(path), os.path.getsize(path)) == before
        assert [b.name for b in img.bitmaps] == ["ck"]
        assert plan.end_before == end
        assert plan.capacity == worst.capacity == 0
        assert plan.bytes > 0 and plan.end_after > plan.end_before
        assert worst.bytes >= plan.bytes
        assert worst.end_after >= plan.end_after
        # 1 GiB at 512 B a bit is 256 KiB of bitmap, four clusters: the
        # mark dirties one of them, a full bitmap would need all four.
        assert worst.bytes > plan.bytes
        img.commit()
        assert img.end_offset() == plan.end_after
    assert qemu_image_end(path) == plan.end_after
    assert judge(path)["ck"] == [(3 * MiB, 64 * KiB)]
    with pytest.raises(TypeError):
        qbm.open(path).commit_plan(True)


def test_commit_plan_device_too_small(d):
    """On a block device the plan counts the device: capacity is its size,
    and an edit that would not fit is refused with ENOSPC, as the commit
    is, the device left as it was."""
    try:
        loop = LoopDevice(str(d), 320 * KiB, "dev", fill=b"\0")
    except OSError as e:
        if qbmtest.in_ci():
            raise
        pytest.skip("no loop device: %s" % e)
    with loop:
        dev = qemu_img_create(loop.node, 64 * MiB)
        before = file_hash(dev)
        end = qemu_image_end(dev)
        with qbm.open(dev, write=True) as img:
            assert img.capacity == 320 * KiB
            assert img.end_offset() == end
            img.add("ck")
            with pytest.raises(qbm.Error) as e:
                img.commit_plan()
            assert e.value.errno == errno.ENOSPC
            with pytest.raises(qbm.Error) as e:
                img.commit()
            assert e.value.errno == errno.ENOSPC
        assert file_hash(dev) == before
        assert qemu_image_end(dev) == end
        qemu_img_check(dev)


def space_in_message(msg):
    """[(needed, end_before, capacity)] from each "not enough space"
    message part."""
    return [tuple(int(x) for x in m) for m in re.findall(
        r"the edit needs (\d+) bytes past the image end (\d+); "
        r"the device has (\d+)", msg)]


def loop_or_skip(d, size, name):
    try:
        return LoopDevice(str(d), size, name, fill=b"\0")
    except OSError as e:
        if qbmtest.in_ci():
            raise
        pytest.skip("no loop device: %s" % e)


def test_commit_plan_device_too_small_figures(d):
    """A plan refused only because the device is too small carries its
    figures (qbm.Error.space), the same the message prints; extended to
    space.end_after, the device takes the commit, which ends there."""
    loop = loop_or_skip(d, 64 * MiB, "dev")
    with loop:
        dev = qemu_img_create(loop.node, 64 * MiB)
        end = qemu_image_end(dev)
        loop.resize(end)
        before = file_hash(dev)
        with qbm.open(dev) as img:
            with pytest.raises(qbm.Error) as e:
                img.commit_plan()
            assert e.value.errno == errno.EROFS and e.value.space is None
        with qbm.open(dev, write=True) as img:
            img.add("ck")
            img.mark("ck", 0, 64 * MiB)
            with pytest.raises(qbm.Error) as e:
                img.commit_plan()
        sp = e.value.space
        assert e.value.errno == errno.ENOSPC
        assert isinstance(sp, qbm.SpaceInfo)
        assert (sp.end_before, sp.capacity) == (end, end)
        assert sp.end_after > end and sp.bytes >= sp.end_after - end
        assert space_in_message(e.value.message) == [
            (sp.end_after - sp.end_before, sp.end_before, sp.capacity)]
        assert file_hash(dev) == before
        loop.resize(sp.end_after)
        with qbm.open(dev, write=True) as img:
            img.add("ck")
            img.mark("ck", 0, 64 * MiB)
            again = img.commit_plan()
            assert (again[:3], again.capacity) == (sp[:3], sp.end_after)
            img.commit()
        assert qemu_image_end(dev) == sp.end_after
        assert judge(dev)["ck"] == [(0, 64 * MiB)]


def test_carry_snapshot_dry_run_device_too_small(d):
    """carry_snapshot(dry_run=True) on devices that end where their images
    do: TOP's does not fit, and the error's space is the (top, base) pair,
    BASE planned all the same (its new directory takes a free cluster),
    TOP's figures those of the message; extended to them, the real run
    fits, TOP ending where its plan said."""
    with loop_or_skip(d, 8 * MiB, "base") as lb, \
            loop_or_skip(d, 8 * MiB, "top") as lt:
        base = qemu_img_create(lb.node, 32 * MiB)
        qemu_img("bitmap", "--add", base, "ck")
        qemu_io(base, "write 0 64k")
        top = qemu_img_create(lt.node, 32 * MiB, backing=base)
        qemu_io(top, "write 2M 64k", "write 9M 1M")
        for loop, img in ((lb, base), (lt, top)):
            loop.resize(qemu_image_end(img))
        before = file_hash(base), file_hash(top)
        with pytest.raises(qbm.Error) as e:
            qbm.carry_snapshot(base, top, disable_base=True, dry_run=True)
        assert e.value.errno == errno.ENOSPC
        t, b = e.value.space
        assert (file_hash(base), file_hash(top)) == before
        assert (t.capacity, b.capacity) == (lt.size, lb.size)
        assert t.end_after > t.capacity
        assert b.bytes > 0 and b.end_after <= b.capacity
        assert space_in_message(e.value.message) == [
            (t.end_after - t.end_before, t.end_before, t.capacity)]
        lt.resize(t.end_after)
        t2, b2 = qbm.carry_snapshot(base, top, disable_base=True,
                                    dry_run=True)
        assert (t2[:3], t2.capacity, b2) == (t[:3], t.end_after, b)
        qbm.carry_snapshot(base, top, disable_base=True)
        assert qemu_image_end(top) == t.end_after
        assert qemu_image_end(base) <= b.end_after
        assert judge(top)["ck"] == [(2 * MiB, 64 * KiB), (9 * MiB, MiB)]
        qemu_img_check(base)
        assert qemu_view(base)["ck"] == (65536, False, False)


def test_carry_snapshot_dry_run_space(d):
    """carry_snapshot(dry_run=True) writes nothing and returns each
    image's SpaceInfo; TOP's end_after is QEMU's image end offset of TOP
    after the real run."""
    size = 32 * MiB
    base = create(d, "base.qcow2", size)
    qemu_img("bitmap", "--add", base, "ck")
    qemu_io(base, "write 0 64k")
    top = create(d, "top.qcow2", size, backing="base.qcow2")
    qemu_io(top, "write 2M 64k", "write 9M 1M")
    before = file_hash(base), file_hash(top)
    top_end, base_end = qemu_image_end(top), qemu_image_end(base)
    t, b = qbm.carry_snapshot(base, top, dry_run=True)
    assert (b.bytes, b.end_before, b.end_after) == (0, 0, 0)
    t2, b = qbm.carry_snapshot(base, top, disable_base=True, dry_run=True)
    assert t2 == t
    assert (file_hash(base), file_hash(top)) == before
    assert isinstance(t, qbm.SpaceInfo) and t.capacity == b.capacity == 0
    assert t.end_before == top_end and b.end_before == base_end
    assert t.bytes > 0 and t.end_after > t.end_before
    assert b.bytes > 0
    qbm.carry_snapshot(base, top, disable_base=True)
    assert qemu_image_end(top) == t.end_after
    assert qemu_image_end(base) <= b.end_after
    assert judge(top)["ck"] == [(2 * MiB, 64 * KiB), (9 * MiB, MiB)]
    assert qemu_view(base)["ck"] == (65536, False, False)


def test_names_not_utf8_round_trip(d):
    """A name that is not UTF-8 comes as surrogates and goes back to the
    library unchanged, as str or bytes."""
    path = create(d, "n.qcow2")
    with qbm.open(path, write=True) as img:
        img.add(b"\xffck")
        img.mark(b"\xffck", 0, 1)
        img.commit()
        name = img.bitmaps[0].name
        assert name == "\udcffck"
        assert list(img.extents(name)) == [(0, 65536)]
        img.rename(name, "ck")
        img.commit()
    assert judge(path)["ck"] == [(0, 65536)]
