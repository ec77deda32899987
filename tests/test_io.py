"""soulkit._io: atomic writes leave the old or the new file, never a temporary one."""

from soulkit._io import atomic_write_text


def test_atomic_write(tmp_path):
    target = tmp_path / "sub" / "x.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["x.txt"]
