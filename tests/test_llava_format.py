"""The LLaVA-format reader: valid records load; unsafe or broken ones fail naming file and record."""
from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from cvit_bench.data.llava_format import DataError, read_llava_json
from cvit_bench.data.samples import load_image


def make_dataset(tmp_path, image="images/a.png", human="<image>\nWhat colour?", **extra):
    (tmp_path / "images").mkdir(exist_ok=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "images" / "a.png")
    record = {"id": "r0", "image": image, "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": "red"}], **extra}
    path = tmp_path / "train.json"
    path.write_text(json.dumps([record]))
    return path


def test_reads_a_plain_llava_record(tmp_path):
    [record] = read_llava_json(make_dataset(tmp_path))
    assert record.question == "What colour?" and record.answer == "red" and record.answers == ("red",)
    assert record.image == (tmp_path / "images" / "a.png").resolve()


@pytest.mark.parametrize("image", ["../outside.png", "/etc/passwd", "images/../../outside.png"])
def test_paths_escaping_the_root_are_refused(tmp_path, image):
    root = tmp_path / "data"
    root.mkdir()
    (tmp_path / "outside.png").write_bytes(b"x")
    with pytest.raises(DataError, match=r"train.json: record 0 \(id r0\)\.image"):
        read_llava_json(make_dataset(root, image=image))


def test_symlink_out_of_the_root_is_refused(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    path = make_dataset(root, image="images/link.png")
    os.symlink(tmp_path / "secret.png", root / "images" / "link.png")
    with pytest.raises(DataError, match="escapes the image root"):
        read_llava_json(path)


def test_links_lead_only_into_named_directories(tmp_path, monkeypatch):
    """A linked shared copy (cluster layout) is followed when its directory is named; the path text still cannot escape."""
    root, shared = tmp_path / "data", tmp_path / "shared" / "coco"
    root.mkdir()
    shared.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(shared / "x.png")
    (tmp_path / "outside.png").write_bytes(b"x")
    path = make_dataset(root, image="images/coco/x.png")
    os.symlink(shared, root / "images" / "coco")
    with pytest.raises(DataError, match="CVIT_IMAGE_LINK_TARGETS"):
        read_llava_json(path)
    monkeypatch.setenv("CVIT_IMAGE_LINK_TARGETS", str(tmp_path / "shared"))
    assert read_llava_json(path)[0].image == (shared / "x.png").resolve()
    monkeypatch.setenv("CVIT_IMAGE_LINK_TARGETS", str(tmp_path))  # naming a directory never lets the path text itself escape
    with pytest.raises(DataError, match="escapes the image root"):
        read_llava_json(make_dataset(root, image="images/../../outside.png"))


def test_missing_image_names_record_and_file(tmp_path):
    with pytest.raises(DataError, match=r"record 0 \(id r0\)\.image: file not found"):
        read_llava_json(make_dataset(tmp_path, image="images/missing.png"))


def test_record_without_image_token_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"conversations\[0\]\.value: the human turn must contain <image>"):
        read_llava_json(make_dataset(tmp_path, human="What colour?"))


def test_empty_task_and_bad_json_are_refused(tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="empty.json: no records"):
        read_llava_json(tmp_path / "empty.json")
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(DataError, match="bad.json: malformed JSON"):
        read_llava_json(tmp_path / "bad.json")


def test_corrupt_image_fails_with_its_path(tmp_path):
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"not a png")
    with pytest.raises(DataError, match="corrupt.png: cannot read image"):
        load_image(path)
