
import numpy as np
import pytest
from PIL import Image

from helpers.errors import UserError
from helpers.files import atomic_path, check_can_write, folder_size, outputs_dir, project_root
from helpers.images import enlarge, read_image_metadata, save_image
from helpers.report import Table


def test_outputs_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FLUX_OUTPUTS", str(tmp_path / "out"))
    assert outputs_dir() == tmp_path / "out"
    monkeypatch.delenv("FLUX_OUTPUTS")
    root = project_root()
    assert root is not None and outputs_dir() == root / "outputs"


def test_atomic_write_and_refusal(tmp_path):
    target = tmp_path / "sub" / "result.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("first")
    assert target.read_text() == "first"
    with pytest.raises(UserError, match="already exists"):
        with atomic_path(target) as tmp:
            pass
    with atomic_path(target, overwrite=True) as tmp:
        tmp.write_text("second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.txt"]


def test_failed_write_leaves_target_and_no_temp(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("precious")
    with pytest.raises(RuntimeError):
        with atomic_path(target, overwrite=True) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_check_can_write_rejects_a_folder(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        check_can_write(tmp_path)


def test_folder_size(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b").write_bytes(b"x" * 5)
    assert folder_size(tmp_path) == 15


def test_save_image_keeps_metadata_and_refuses_overwrite(tmp_path):
    img = Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3))
    path = save_image(img, tmp_path / "images" / "x.png", {"prompt": "a cat", "seed": 7, "size": [64, 64]})
    meta = read_image_metadata(path)
    assert meta == {"prompt": "a cat", "seed": "7", "size": "[64, 64]"}
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(img))
    with pytest.raises(UserError, match="already exists"):
        save_image(img, path, {})
    save_image(img, path, {"prompt": "again"}, overwrite=True)
    assert read_image_metadata(path)["prompt"] == "again"
    with pytest.raises(UserError, match="PNG"):
        save_image(img, tmp_path / "x.jpg")
    assert enlarge(img, 3).size == (192, 192)
    assert not [p for p in (tmp_path / "images").iterdir() if p.name.startswith(".")]


def test_table_text_and_html():
    t = Table([{"name": "a<b", "n": 1234}, {"name": "long name", "n": 5}], formats={}, title="T")
    lines = str(t).splitlines()
    assert lines[0] == "T" and lines[1].startswith("name") and lines[3].endswith("1,234")
    assert lines[4].endswith("    5")  # numbers right-aligned
    html = t._repr_html_()
    assert "a&lt;b" in html and "<caption>T</caption>" in html and "text-align:right" in html
