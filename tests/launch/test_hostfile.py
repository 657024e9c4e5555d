"""Hostfiles and host selection: every broken case is its documented one-line error."""
import pytest

from launch.hostfile import HostfileError, read_hostfile, select_resources
from tests.launch.conftest import write_hostfile

BROKEN = [
    ("node-a slots=2\nnode-b\n", r":2: 'node-b' has no slots=N \(expected '<host> slots=<N>'\)$"),
    ("node-a slot=2\n", r":1: expected 'slots=<N>' after 'node-a', got 'slot=2'$"),
    ("node-a slots=0\n", r":1: slots must be a positive integer, got 'slots=0'$"),
    ("node-a slots=-1\n", r":1: slots must be a positive integer, got 'slots=-1'$"),
    ("node-a slots=four\n", r":1: slots must be a positive integer, got 'slots=four'$"),
    ("node-a slots=2 gpus=8\n", r":1: unexpected 'gpus=8' after 'slots=2'$"),
    ("# head\nnode-a slots=2\n\nnode-b slots=2\nnode-a slots=4\n", r":5: host 'node-a' is listed twice \(first on line 2\)$"),
    ("node:a slots=2\n", r":1: host name 'node:a' contains ':', which --include/--exclude cannot name$"),
    ("# only comments\n\n   \n", r": no hosts \(every line is blank or a comment\)$"),
    ("", r": no hosts"),
]


@pytest.mark.parametrize("text, message", BROKEN, ids=[m.split(":")[1] if m.startswith(":") and m[1].isdigit()
                                                        else m[2:12] for _, m in BROKEN])
def test_each_broken_hostfile_is_a_one_line_error_naming_file_and_line(tmp_path, text, message):
    path = write_hostfile(tmp_path, text)
    with pytest.raises(HostfileError, match=message) as err:
        read_hostfile(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_a_missing_hostfile_or_a_directory_is_refused_naming_the_path(tmp_path):
    with pytest.raises(HostfileError, match=rf"^hostfile {tmp_path / 'nope'} does not exist$"):
        read_hostfile(tmp_path / "nope")
    with pytest.raises(HostfileError, match=rf"^hostfile {tmp_path} is not a file$"):
        read_hostfile(tmp_path)


def test_comments_blank_lines_and_order_are_kept(tmp_path):
    hosts = read_hostfile(write_hostfile(tmp_path, "# cluster\n\nworker-1 slots=4  # fast\n\tworker-0\tslots=2\n"))
    assert [(h.name, h.slots, h.line) for h in hosts] == [("worker-1", 4, 3), ("worker-0", 2, 4)]


def test_select_resources_follows_deepspeeds_include_exclude_num_nodes_num_gpus(tmp_path):
    hosts = read_hostfile(write_hostfile(tmp_path, "a slots=4\nb slots=4\nc slots=2\n"))
    assert select_resources(hosts) == {"a": [0, 1, 2, 3], "b": [0, 1, 2, 3], "c": [0, 1]}
    assert select_resources(hosts, include="c@a:1,3") == {"a": [1, 3], "c": [0, 1]}  # hostfile order
    assert select_resources(hosts, exclude="b@a:0") == {"a": [1, 2, 3], "c": [0, 1]}
    assert select_resources(hosts, num_nodes=2) == {"a": [0, 1, 2, 3], "b": [0, 1, 2, 3]}
    assert select_resources(hosts, num_gpus=2) == {"a": [0, 1], "b": [0, 1], "c": [0, 1]}
    for kwargs, message in [
        ({"include": "d"}, r"--include 'd': host 'd' is not in the hostfile \(hosts: a, b, c\)"),
        ({"exclude": "c:2"}, r"--exclude 'c:2': host 'c' has slots 0..1, not '2'"),
        ({"include": "a", "exclude": "b"}, "cannot be combined"),
        ({"include": "a", "num_gpus": 1}, "cannot be combined"),
        ({"num_nodes": 4}, "--num-nodes 4: the hostfile has only 3 hosts"),
        ({"num_gpus": 3}, "--num-gpus 3: host 'c' has only 2 slots"),
        ({"exclude": "a@b@c"}, "no host left"),
    ]:
        with pytest.raises(HostfileError, match=message):
            select_resources(hosts, **kwargs)
