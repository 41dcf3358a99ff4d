"""Labelled lists: the three formats, labels through the class list, and errors that name file and line."""

from __future__ import annotations

import pytest

from x3dnet.datasets import DatasetError, class_key, read_dataset
from x3dnet.predict import kinetics400_classes

K400 = kinetics400_classes()


def touch(root, *names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def test_path_label_lists(tmp_path):
    (tmp_path / "val.csv").write_text(
        "abseiling/a.mp4 0\n\n"  # blank lines are skipped
        "/abs/zumba/b.mp4 399\n"
        "air drumming/c d.mp4\t2\n"  # a path with a space; tab separated
        "yoga/e.mp4 yoga\n"  # a label given by name
        "passing_American_football_(in_game)/f.mp4 passing_American_football_(in_game)\n"
    )
    data = read_dataset(tmp_path / "val.csv", classes=K400)
    assert data.format == "slowfast"
    assert [(s.video, s.label) for s in data.samples] == [
        ("abseiling/a.mp4", 0), ("/abs/zumba/b.mp4", 399), ("air drumming/c d.mp4", 2),
        ("yoga/e.mp4", K400.index("yoga")),
        ("passing_American_football_(in_game)/f.mp4", K400.index("passing American football (in game)")),
    ]
    assert data.samples[0].path == tmp_path / "abseiling/a.mp4"  # relative to the list's folder by default
    assert str(data.samples[1].path) == "/abs/zumba/b.mp4"
    assert data.samples[2].where == f"{tmp_path / 'val.csv'}:4"
    other = read_dataset(tmp_path / "val.csv", classes=K400, root="/data/k400")
    assert str(other.samples[0].path) == "/data/k400/abseiling/a.mp4"


def test_kinetics_csv_finds_clips_and_maps_names_through_the_class_list(tmp_path):
    (tmp_path / "validate.csv").write_text(
        "label,youtube_id,time_start,time_end,split,is_cc\n"
        '"air drumming",--nQbRBEz2s,104,114,val,0\n'
        "abseiling,-3B32lodo2M,59,69,val,0\n"
        '"zumba",__wsytoYy3Q,0,10.0,val,0\n'
        "yoga,missing_clip,5,15,val,0\n"
    )
    videos = tmp_path / "videos"
    touch(videos, "air_drumming/--nQbRBEz2s_000104_000114.mp4", "-3B32lodo2M_000059_000069.mkv",
          "val/zumba/__wsytoYy3Q_000000_000010.webm", "train/zumba/__wsytoYy3Q_000000_000010.notes.txt")
    touch(videos, "abseiling/-3B32lodo2M_000059_000069.mp4")  # two copies: its class folder wins
    data = read_dataset(tmp_path / "validate.csv", classes=K400, root=videos)
    assert data.format == "kinetics-csv"
    assert [(s.video, s.label) for s in data.samples] == [
        ("air_drumming/--nQbRBEz2s_000104_000114.mp4", K400.index("air drumming")),
        ("abseiling/-3B32lodo2M_000059_000069.mp4", 0),
        ("val/zumba/__wsytoYy3Q_000000_000010.webm", 399),
        ("yoga/missing_clip_000005_000015.mp4", K400.index("yoga")),  # not found: reported when evaluated
    ]
    assert not data.samples[3].path.exists()


def test_labels_never_come_from_the_classes_present(tmp_path):
    # Only three classes have videos; their indices are still their places among all 400.
    for name in ("zumba", "abseiling", "yoga"):
        touch(tmp_path / "tree", f"{name}/x.mp4")
    touch(tmp_path / "tree", "yoga/notes.txt", ".hidden/y.mp4", "list.txt")
    data = read_dataset(tmp_path / "tree", classes=K400)
    assert data.format == "folders"
    assert [(s.video, s.label) for s in data.samples] == [
        ("abseiling/x.mp4", 0), ("yoga/x.mp4", K400.index("yoga")), ("zumba/x.mp4", 399)]


def test_class_names_match_across_spellings():
    assert class_key("passing_American_football_(not_in_game)") == class_key("passing American football (not in game)")
    assert class_key("massaging_persons_head") == class_key("massaging person's head")
    assert class_key('"air drumming"') == class_key("air drumming")
    assert len({class_key(name) for name in K400}) == 400


@pytest.mark.parametrize("text,message", [
    ("a.mp4 0\nb.mp4\n", "val.txt:2: expected 'path label', got 'b.mp4'"),
    ("a.mp4 0\n\nb.mp4 400\n", "val.txt:3: label 400 is outside 0..399 (400 classes)"),
    ("a.mp4 -1\n", "val.txt:1: label -1 is outside 0..399"),
    ("a.mp4 flying\n", "val.txt:1: unknown label 'flying' (not among the 400 classes)"),
    ("a.mp4 3\nb.mp4 4\na.mp4 3\n", "val.txt:3: a.mp4 is listed twice (first at"),
    ("\n\n", "val.txt: lists no videos"),
])
def test_bad_path_label_lines_name_file_and_line(tmp_path, text, message):
    (tmp_path / "val.txt").write_text(text)
    with pytest.raises(DatasetError, match=None) as e:
        read_dataset(tmp_path / "val.txt", classes=K400)
    assert str(e.value).startswith(str(tmp_path)) and message in str(e.value)


@pytest.mark.parametrize("text,message", [
    ("label,youtube_id,time_start,time_end,split\nflying,abc,1,11,val\n", "k.csv:2: unknown label 'flying'"),
    ('label,youtube_id,time_start,time_end,split\nyoga,a,1,11,val\n"air drumming",b,x,11,val\n',
     "k.csv:3: time_start and time_end must be numbers"),
    ("label,youtube_id,time_start,time_end,split\nyoga,a,1,11\n", "k.csv:2: expected 5 fields"),
    ("label,youtube_id,split\nyoga,a,val\n", "k.csv:1: the header lacks time_start, time_end"),
    ("youtube_id,time_start,time_end,split\na,1,11,test\n", "k.csv:1: no label column"),
    ("label,youtube_id,time_start,time_end,split\n7,abc,1,11,val\n", "k.csv:2: unknown label '7'"),
])
def test_bad_kinetics_csv_rows_name_file_and_line(tmp_path, text, message):
    (tmp_path / "k.csv").write_text(text)
    with pytest.raises(DatasetError) as e:
        read_dataset(tmp_path / "k.csv", classes=K400)
    assert message in str(e.value)


def test_bad_folder_trees_and_paths(tmp_path):
    touch(tmp_path / "tree", "yoga/x.mp4", "not a class/y.mp4")
    with pytest.raises(DatasetError, match=r"tree/not a class: unknown label 'not a class'"):
        read_dataset(tmp_path / "tree", classes=K400)
    touch(tmp_path / "empty", "yoga/readme.txt")
    with pytest.raises(DatasetError, match=r"empty: no videos in class folders"):
        read_dataset(tmp_path / "empty", classes=K400)
    with pytest.raises(DatasetError, match=r"nope.txt: no such file or folder"):
        read_dataset(tmp_path / "nope.txt", classes=K400)
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DatasetError, match=r"binary.txt: cannot read the list"):
        read_dataset(tmp_path / "binary.txt", classes=K400)
    with pytest.raises(DatasetError, match=r"'air drumming' and 'air_drumming' cannot be told apart"):
        read_dataset(tmp_path / "tree", classes=["air drumming", "air_drumming"])
