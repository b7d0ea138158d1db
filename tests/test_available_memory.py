"""One available_memory for every fit: the cgroup's limit counts, as it is the one that kills."""

from anomaly_model import memory


def test_a_cgroup_limit_below_mem_available_is_what_a_fit_may_use(tmp_path, monkeypatch):
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text("3000000000\n")
    usage.write_text("1000000000\n")
    monkeypatch.setattr(memory, "CGROUP_FILES", ((str(limit), str(usage)),))
    monkeypatch.setattr(memory, "_mem_available", lambda: 20_000_000_000)
    assert memory.available_memory() == 2_000_000_000
    limit.write_text("max\n")
    assert memory.available_memory() == 20_000_000_000


def test_cgroup_v1_files_are_read_when_v2_is_absent(tmp_path, monkeypatch):
    limit, usage = tmp_path / "memory.limit_in_bytes", tmp_path / "memory.usage_in_bytes"
    limit.write_text("1000\n")
    usage.write_text("400\n")
    monkeypatch.setattr(memory, "CGROUP_FILES", ((str(tmp_path / "absent"), str(tmp_path / "absent2")), (str(limit), str(usage))))
    assert memory.cgroup_room() == 600
    limit.write_text(str(2**63 - 4096))  # v1's "no limit"
    assert memory.cgroup_room() is None
