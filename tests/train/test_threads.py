"""Default torch threads: physical cores of the process's affinity, shared by local processes, fewer when busy."""
import subprocess
import sys

import pytest

from unipeft.train.threads import default_threads, physical_cores


def fake_topology(tmp_path, cores_of_cpu: dict[int, int]):
    for cpu, core in cores_of_cpu.items():
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text("0\n")
        (topo / "core_id").write_text(f"{core}\n")
    return tmp_path


def test_hyperthreads_count_once(tmp_path):
    sysfs = fake_topology(tmp_path, {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2, 6: 3, 7: 3})
    assert physical_cores(list(range(8)), sysfs) == 4
    assert physical_cores([0, 1], sysfs) == 1  # affinity restricted to one core's two hyper-threads
    choice = default_threads(load=0.0, cpus=list(range(8)), sysfs=sysfs)
    assert (choice.threads, choice.warning) == (4, None)


def test_local_processes_share_the_cores(tmp_path):
    sysfs = fake_topology(tmp_path, {i: i for i in range(8)})
    assert default_threads(local_processes=2, load=0.0, cpus=list(range(8)), sysfs=sysfs).threads == 4
    assert default_threads(local_processes=16, load=0.0, cpus=list(range(8)), sysfs=sysfs).threads == 1


def test_busy_machine_falls_back_with_a_warning(tmp_path):
    sysfs = fake_topology(tmp_path, {i: i for i in range(8)})
    choice = default_threads(load=6.0, cpus=list(range(8)), sysfs=sysfs)
    assert choice.threads == 3 and "load average 6.0" in choice.warning  # 8 - 6 free, + 1 for our own start-up
    assert default_threads(load=20.0, cpus=list(range(8)), sysfs=sysfs).threads == 1
    # start-up noise is not a busy machine: load 0.8 on 2 CPUs keeps both threads
    two = fake_topology(sysfs / "two", {0: 0, 1: 1})
    assert default_threads(load=0.8, cpus=[0, 1], sysfs=two) == default_threads(load=0.0, cpus=[0, 1], sysfs=two)
    assert default_threads(load=2.1, cpus=[0, 1], sysfs=two).threads == 1


def test_affinity_of_this_process_is_read():
    import os

    choice = default_threads(load=0.0)
    assert 1 <= choice.threads <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]])
def test_python_dash_m_works_like_the_script(argv):
    out = subprocess.run([sys.executable, "-m", "unipeft", *argv], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: unipeft")
