"""alexnet-prep verify: passes on a clean build, catches corrupted, missing and mislabelled records."""

import shutil

import numpy as np
import pytest
from _build_lmdb_fixtures import clean_build, run_prep

from alexnet.pipeline import artifacts as A
from alexnet.tools.verify import VerifyConfig, verify


@pytest.fixture
def data(tmp_path_factory, tmp_path):
    """A private copy of the clean build, free to damage."""
    out = tmp_path / "d"
    shutil.copytree(clean_build(tmp_path_factory.getbasetemp()), out)
    return out


def _first_shard(data):
    m = A.read_manifest(data)
    return m, m.shard_paths(data, "train")[0]


def _rewrite(shard, fn):
    """Replace the value of the shard's first record with fn(key, value) (crc32.npy left as it was)."""
    env = A.open_shard(shard, readonly=False)
    with env.begin(write=True) as txn:
        key, value = next(iter(txn.cursor()))
        txn.put(bytes(key), fn(bytes(key), bytes(value)))
    env.close()
    return bytes(key)


def test_clean_dataset_verifies(data):
    r = run_prep(["verify", "--data-dir", str(data), "--no-progress"])
    assert r.exit_code == 0, r.output
    m = A.read_manifest(data)
    n = sum(s.num_records for s in m.splits.values())
    assert f"{n} records decoded and checksummed" in r.output
    report = verify(VerifyConfig(data, sample=3, seed=1, progress=False))
    assert report.ok and report.checked == 3 * len(m.splits)


def test_corrupted_record_is_caught(data):
    _, shard = _first_shard(data)

    def flip(_key, value):  # one byte inside the JPEG data
        b = bytearray(value)
        b[len(b) // 2] ^= 0xFF
        return bytes(b)

    key = _rewrite(shard, flip)
    r = run_prep(["verify", "--data-dir", str(data), "--no-progress"])
    assert r.exit_code == 1
    assert "checksum mismatch" in r.output and key.decode() in r.output
    assert "error: " in r.output and "problems in" in r.output and "Traceback" not in r.output


def test_wrong_label_and_garbage_value_are_caught(data):
    m, shard = _first_shard(data)
    n_classes = len(m.classes)

    def relabel(_key, value):
        d = A.Datum.decode(value)
        return A.Datum(data=d.data, label=n_classes + 5, height=d.height, width=d.width).encode()

    _rewrite(shard, relabel)
    problems = verify(VerifyConfig(data, progress=False)).problems
    assert any(f"label {n_classes + 5} outside" in p for p in problems)
    assert any("checksum mismatch" in p for p in problems)

    _rewrite(shard, lambda _k, v: A.Datum(data=b"not a jpeg", label=0, height=256, width=256).encode())
    problems = verify(VerifyConfig(data, progress=False)).problems
    assert any("JPEG does not decode" in p for p in problems)


def test_missing_record_and_checksums_are_caught(data):
    m, shard = _first_shard(data)
    env = A.open_shard(shard, readonly=False)
    with env.begin(write=True) as txn:
        key = bytes(next(iter(txn.cursor()))[0])
        txn.delete(key)
    env.close()
    problems = verify(VerifyConfig(data, progress=False)).problems
    want = m.splits["train"].shards[0].num_records
    assert any(f"{want - 1} records, manifest says {want}" in p for p in problems)
    assert any("checksums for" in p for p in problems)
    (shard / A.RECORD_CRC_FILE).unlink()
    assert any("checksum file missing" in p for p in verify(VerifyConfig(data, progress=False)).problems)


def test_sampled_verify_still_checks_counts(data):
    _, shard = _first_shard(data)
    crcs = A.read_record_crcs(shard)
    A.write_record_crcs(shard, np.concatenate([crcs, crcs[:1]]))
    report = verify(VerifyConfig(data, sample=1, progress=False))
    assert not report.ok and any("checksums for" in p for p in report.problems)


def test_half_built_or_absent_dataset_is_a_clear_error(data, tmp_path):
    r = run_prep(["verify", "--data-dir", str(tmp_path / "none")])
    assert r.exit_code == 1 and "error: no dataset" in r.output
    m = A.read_manifest(data)
    m.complete = False
    A.write_manifest(data, m)
    r = run_prep(["verify", "--data-dir", str(data)])
    assert r.exit_code == 1 and "half-built" in r.output


def test_checks_that_span_shards_are_merged_after_the_workers(data):
    """A record of shard 0 copied into shard 1: outside shard 1's block, not after shard 0's positions,
    and its source file stored twice; the same problems, in the same order, from one process or two."""
    m = A.read_manifest(data)
    first, second = m.shard_paths(data, "train")[:2]
    with A.open_shard(first) as env, env.begin() as txn:
        key, value = next(iter(txn.cursor()))
        key, value = bytes(key), bytes(value)
    env = A.open_shard(second, readonly=False)
    with env.begin(write=True) as txn:
        txn.put(key, value)
    env.close()
    one, two = (verify(VerifyConfig(data, workers=w, progress=False)) for w in (1, 2))
    assert one.problems == two.problems and one.checked == two.checked
    where = f"{m.splits['train'].shards[1].path} {key.decode()}"
    rel = A.parse_key(key)[1]
    assert f"{where}: source file {rel} stored twice" in one.problems
    assert any(p.startswith(f"{where}: position outside the shard's block") for p in one.problems)
    assert any(p.startswith(f"{where}: position not after the previous record's") for p in one.problems)


def test_workers_option_and_a_sample_check_the_same_records(data):
    r = run_prep(["verify", "--data-dir", str(data), "--workers", "2", "--sample", "5", "--no-progress"])
    assert r.exit_code == 0 and "10 records decoded and checksummed" in r.output, r.output
    a, b = (verify(VerifyConfig(data, sample=5, seed=2, workers=w, progress=False)) for w in (1, 2))
    assert a.checked == b.checked == 10 and a.ok and b.ok
