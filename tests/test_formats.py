"""Parsers of the distributed formats: VOC clicks, ScribbleSup, VOC boxes, Cityscapes ids."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_weak_labels import VOID

from agmm_lightning import weak_labels as wl
from agmm_lightning.data.cityscapes import (
    CITYSCAPES_LABELID_TO_TRAINID,
    cityscapes_labelids_to_target,
)
from agmm_lightning.data.voc import (
    VOC_CLASSES,
    VOC_SCRIBBLE_ALIASES,
    read_scribblesup_xml,
    read_voc_annotation,
    read_voc_points,
)


def test_boxes_roundtrip_with_voc_annotation(tmp_path):
    xml = """<annotation><size><width>50</width><height>40</height></size>
      <object><name>dog</name><difficult>0</difficult>
        <bndbox><xmin>5</xmin><ymin>3</ymin><xmax>20</xmax><ymax>30</ymax></bndbox></object>
      <object><name>person</name><difficult>1</difficult>
        <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>50.0</xmax><ymax>40</ymax></bndbox></object>
    </annotation>"""
    path = tmp_path / "2007_000001.xml"
    path.write_text(xml)
    boxes = read_voc_annotation(path, VOC_CLASSES)
    dog, person = VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")
    assert boxes.dtype == np.float32
    assert boxes.tolist() == [[4, 2, 20, 30, dog], [0, 0, 50, 40, person]]
    # 1-based inclusive (xmin=5..xmax=20) covers 0-based columns 4..19: 16 pixels.
    target, _ = wl.rasterize_boxes(boxes[:1], (40, 50), 21)
    assert (target[10] == 21).sum() == 16
    easy = read_voc_annotation(path, VOC_CLASSES, include_difficult=False)
    assert easy.tolist() == [[4, 2, 20, 30, dog]]


# --------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------


def test_read_voc_points(tmp_path):
    data = {
        "2007_000032": [
            {"x": 10.5, "y": 20, "cls": 1, "rank": 1},
            {"x": 3, "y": 4, "cls": 15, "rank": 2},
        ],
        "2007_000039": [],
    }
    path = tmp_path / "points.json"
    path.write_text(json.dumps(data))
    points = read_voc_points(path)
    assert set(points) == set(data)
    assert points["2007_000032"].dtype == np.float32
    assert points["2007_000032"].tolist() == [[10.5, 20, 1], [3, 4, 15]]
    assert points["2007_000039"].shape == (0, 3)
    canvas = wl.rasterize_points(points["2007_000032"], (30, 30), 21)
    assert canvas[20, 11] == 1 and canvas[4, 3] == 15


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"a": 3}', "list of clicks"),
        ('{"a": [{"x": 1, "y": 2}]}', '"cls"'),
    ],
)
def test_read_voc_points_errors(tmp_path, text, match):
    path = tmp_path / "bad_points.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as error:
        read_voc_points(path)
    assert "bad_points.json" in str(error.value)


SCRIBBLE_XML = """<?xml version="1.0"?>
<annotation>
  <filename>2007_000032.jpg</filename>
  <size><width>40</width><height>30</height></size>
  <polygon><tag>plane</tag>
    <point><X>5</X><Y>5</Y></point><point><X>30</X><Y>5</Y></point>
  </polygon>
  <polygon><tag>background</tag>
    <point><X>5</X><Y>25</Y></point><point><X>35</X><Y>25</Y></point>
    <point><X>35</X><Y>15</Y></point>
  </polygon>
  <polygon><tag>Monitor</tag><point><X>20</X><Y>15</Y></point></polygon>
  <polygon><tag>table</tag></polygon>
</annotation>"""


def test_read_and_rasterize_scribblesup(tmp_path):
    path = tmp_path / "2007_000032.xml"
    path.write_text(SCRIBBLE_XML)
    shape, polylines = read_scribblesup_xml(path, VOC_CLASSES)
    assert shape == (30, 40)
    assert [cls for cls, _ in polylines] == [1, 0, 20]  # the empty table polygon is skipped
    assert polylines[0][1].dtype == np.float32
    assert polylines[0][1].tolist() == [[5, 5], [30, 5]]
    target = wl.rasterize_polylines(polylines, shape, 21, width=3)
    assert target.dtype == np.uint8 and target.shape == (30, 40)
    assert np.all(target[4:7, 6:30] == 1) and not np.any(target[8:, :] == 1)
    assert np.all(target[25, 5:36] == 0) and np.all(target[15:26, 35] == 0)
    assert (target == 20).sum() == 5 and target[15, 20] == 20  # single point: radius-1 dot
    assert np.all(target[10:13, 0:3] == 21)
    assert not np.any(target == VOID)


def test_scribblesup_errors(tmp_path):
    path = tmp_path / "unknown_tag.xml"
    path.write_text(SCRIBBLE_XML.replace("<tag>plane</tag>", "<tag>spaceship</tag>"))
    with pytest.raises(ValueError, match="spaceship") as error:
        read_scribblesup_xml(path, VOC_CLASSES)
    assert "unknown_tag.xml" in str(error.value)
    path = tmp_path / "broken.xml"
    path.write_text("<annotation><size>")
    with pytest.raises(ValueError, match="broken.xml"):
        read_scribblesup_xml(path, VOC_CLASSES)
    path = tmp_path / "nosize.xml"
    path.write_text("<annotation></annotation>")
    with pytest.raises(ValueError, match="nosize.xml.*size"):
        read_scribblesup_xml(path, VOC_CLASSES)


def test_scribble_aliases_resolve_to_voc_names():
    for alias, name in VOC_SCRIBBLE_ALIASES.items():
        assert name in VOC_CLASSES, alias
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background"
    assert VOC_CLASSES[1] == "aeroplane" and VOC_CLASSES[-1] == "tvmonitor"


def test_voc_annotation_unknown_class(tmp_path):
    path = tmp_path / "2008_000123.xml"
    path.write_text(
        "<annotation><object><name>unicorn</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
        "<xmax>2</xmax><ymax>2</ymax></bndbox></object></annotation>"
    )
    with pytest.raises(ValueError, match="2008_000123.xml.*unicorn"):
        read_voc_annotation(path, VOC_CLASSES)
    path.write_text("<annotation><object><name>dog</name></object></annotation>")
    with pytest.raises(ValueError, match="bndbox"):
        read_voc_annotation(path, VOC_CLASSES)


# --------------------------------------------------------------------------------------------
# Cityscapes
# --------------------------------------------------------------------------------------------


def test_cityscapes_mapping():
    ids = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
    lut = CITYSCAPES_LABELID_TO_TRAINID
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    assert lut[list(ids)].tolist() == list(range(19))
    assert np.all(np.delete(lut, ids) == VOID)
    label_ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
    target = cityscapes_labelids_to_target(label_ids)
    assert target.dtype == np.uint8 and target.shape == (16, 16)
    assert target.reshape(-1)[list(ids)].tolist() == list(range(19))
    assert np.all(np.delete(target.reshape(-1), ids) == 19)
    void = cityscapes_labelids_to_target(np.array([0, 7, -1, 300]), unlabeled=VOID)
    assert void.tolist() == [VOID, 0, VOID, VOID]


def test_cityscapes_ids_must_be_integers():
    with pytest.raises(ValueError, match="integer"):
        cityscapes_labelids_to_target(np.zeros(3, np.float32))
