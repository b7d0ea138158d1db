"""One available_memory for every fit: the cgroup's limit counts, as it is the one that kills."""

from pathlib import Path

from anomaly_model import memory


def test_a_cgroup_limit_below_mem_available_is_what_a_fit_may_use(tmp_path, monkeypatch):
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text("3000000000\n")
    usage.write_text("1000000000\n")
    monkeypatch.setattr(memory, "CGROUP_FILES", ((str(limit), str(usage)),))
    monkeypatch.setattr(memory, "own_cgroup_files", lambda: [])  # the test machine's own limit, if any, aside
    monkeypatch.setattr(memory, "_mem_available", lambda: 20_000_000_000)
    assert memory.available_memory() == 2_000_000_000
    limit.write_text("max\n")
    assert memory.available_memory() == 20_000_000_000


def test_cgroup_v1_files_are_read_when_v2_is_absent(tmp_path, monkeypatch):
    limit, usage = tmp_path / "memory.limit_in_bytes", tmp_path / "memory.usage_in_bytes"
    limit.write_text("1000\n")
    usage.write_text("400\n")
    monkeypatch.setattr(memory, "CGROUP_FILES", ((str(tmp_path / "absent"), str(tmp_path / "absent2")), (str(limit), str(usage))))
    monkeypatch.setattr(memory, "own_cgroup_files", lambda: [])
    assert memory.cgroup_room() == 600
    limit.write_text(str(2**63 - 4096))  # v1's "no limit"
    assert memory.cgroup_room() is None


def test_the_least_room_of_the_process_s_own_cgroup_and_its_ancestors_counts(tmp_path, monkeypatch):
    """A limit on the process's own cgroup (what systemd-run -p MemoryMax= sets) is found from
    /proc/self/cgroup's path under the mount, an ancestor's limit counts too, absent folders are skipped."""
    root = tmp_path / "memory"
    for folder, limit, usage in (("job", "5000", "1000"), ("job/step", "9000", "1000")):
        (root / folder).mkdir(parents=True)
        (root / folder / "memory.limit_in_bytes").write_text(limit)
        (root / folder / "memory.usage_in_bytes").write_text(usage)
    cgroup = tmp_path / "cgroup"
    cgroup.write_text("5:cpu:/other\n4:memory:/job/step\n")
    real = Path

    def redirected(*parts):  # the module's Path, with the two system paths pointed into tmp_path
        text = str(real(*parts))
        text = text.replace("/proc/self/cgroup", str(cgroup)).replace("/sys/fs/cgroup/memory", str(root))
        return real(text)

    monkeypatch.setattr(memory, "Path", redirected)
    monkeypatch.setattr(memory, "CGROUP_FILES", ())
    assert memory.cgroup_room() == 4000  # the parent's 5000 - 1000, below the child's 8000
    (root / "job" / "memory.limit_in_bytes").write_text("max")
    assert memory.cgroup_room() == 8000


def test_inactive_file_cache_in_the_usage_counts_as_room(tmp_path, monkeypatch):
    """Reading the training images fills the page cache, which a cgroup's usage counts: the kernel
    drops its inactive part before refusing memory, so a fit may have it (v1 total_inactive_file,
    v2 inactive_file)."""
    limit, usage = tmp_path / "memory.limit_in_bytes", tmp_path / "memory.usage_in_bytes"
    limit.write_text("3000\n")
    usage.write_text("2000\n")
    monkeypatch.setattr(memory, "CGROUP_FILES", ((str(limit), str(usage)),))
    monkeypatch.setattr(memory, "own_cgroup_files", lambda: [])
    assert memory.cgroup_room() == 1000
    (tmp_path / "memory.stat").write_text("cache 900\ninactive_file 300\ntotal_inactive_file 700\nactive_file 200\n")
    assert memory.cgroup_room() == 1700
    (tmp_path / "memory.stat").write_text("file 900\ninactive_file 300\n")
    assert memory.cgroup_room() == 1300
