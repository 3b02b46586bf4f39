"""thinking.parse_response: thinking / answer split, answer tags, boxes and points in every bracket style, pixels.

Every expected value below is written by hand from the input text (not computed by the code under test).
"""

from __future__ import annotations

import random

import pytest

from glm41v_jax.thinking import (
    FORCED_ANSWER,
    NO_THINKING_PREFIX,
    boxed,
    history_text,
    parse_response,
    strip_thinking,
)

# ---------------------------------------------------------------------------------------------------------------
# Thinking / answer (the behaviour generate_cli relies on).


@pytest.mark.parametrize("text,thinking,answer", [
    ("<think>a\nb</think><answer>c</answer>", "a\nb", "c"),
    ("<think> a </think>\n<answer> c d", "a", "c d"),
    ("<think>a</think> plain", "a", "plain"),
    ("<think>still thinking", "still thinking", ""),
    ("just text", "", "just text"),
    ("x</think><answer>y</answer>", "x", "y"),
    ("", "", ""),
    # box tags go, what they held stays
    ("<think>t</think><answer>1<|begin_of_box|>2<|end_of_box|></answer>", "t", "12"),
    ("<think>t</think><answer>The answer is <|begin_of_box|>42<|end_of_box|>.</answer>", "t", "The answer is 42."),
    # nested box tags
    ("<answer><|begin_of_box|><|begin_of_box|>7<|end_of_box|><|end_of_box|></answer>", "", "7"),
    # thinking cut short right after it opened an answer-like tag
    ("<think>first <answer>B", "first", "B"),
])
def test_thinking_and_answer(text, thinking, answer):
    r = parse_response(text)
    assert (r["thinking"], r["answer"]) == (thinking, answer)
    assert set(r) == {"thinking", "answer", "boxes", "points"}


def test_constants():
    assert NO_THINKING_PREFIX == "<think></think>"
    assert FORCED_ANSWER == "</think><answer>"


# ---------------------------------------------------------------------------------------------------------------
# Box styles (model-like outputs).


def one_box(text, **kw):
    r = parse_response(text, **kw)
    assert len(r["boxes"]) == 1, r["boxes"]
    return r["boxes"][0]


def test_glm41v_boxed_double_brackets():
    text = ("<think>The user asks where the dog is. It sits in the lower left.</think>"
            "<answer>The dog is located at <|begin_of_box|>[[120, 340, 560, 780]]<|end_of_box|></answer>")
    r = parse_response(text)
    assert r["thinking"] == "The user asks where the dog is. It sits in the lower left."
    assert r["answer"] == "The dog is located at [[120, 340, 560, 780]]"
    assert r["boxes"] == [{"box_1000": [120, 340, 560, 780], "box_px": None, "label": "The dog", "image": 0,
                           "in_range": True, "text": "[120, 340, 560, 780]"}]
    assert r["points"] == []


def test_single_brackets_with_spaces():
    b = one_box("<answer>Bounding box: [ 15 , 25 , 985 , 975 ]</answer>")
    assert b["box_1000"] == [15, 25, 985, 975]
    assert b["label"] is None  # "Bounding box" is filler, not a name
    assert b["text"] == "[ 15 , 25 , 985 , 975 ]"


def test_several_boxes_in_one_group_share_the_label():
    r = parse_response("<answer>Two cats: [[10,20,30,40],[50,60,70,80]]</answer>")
    assert [b["box_1000"] for b in r["boxes"]] == [[10, 20, 30, 40], [50, 60, 70, 80]]
    assert [b["label"] for b in r["boxes"]] == ["Two cats", "Two cats"]
    assert [b["text"] for b in r["boxes"]] == ["[10,20,30,40]", "[50,60,70,80]"]


def test_parentheses_and_floats():
    b = one_box("person (100.5, 200, 300.25, 400)")
    assert b["box_1000"] == [100.5, 200, 300.25, 400]
    assert isinstance(b["box_1000"][0], float) and isinstance(b["box_1000"][1], int)
    assert b["label"] == "person"


def test_corner_pairs():
    b = one_box("<answer>The red car: [(110, 220), (330, 440)]</answer>")
    assert b["box_1000"] == [110, 220, 330, 440]
    assert b["label"] == "The red car"
    assert b["text"] == "[(110, 220), (330, 440)]"
    assert one_box("((1, 2), (3, 4))")["box_1000"] == [1, 2, 3, 4]


def test_newlines_inside_box_tags():
    text = "<answer><|begin_of_box|>[[\n  10,\n  20,\n  30,\n  40\n]]<|end_of_box|></answer>"
    r = parse_response(text)
    assert r["answer"] == "[[\n  10,\n  20,\n  30,\n  40\n]]"
    assert r["boxes"][0]["box_1000"] == [10, 20, 30, 40]
    assert r["boxes"][0]["label"] is None


def test_list_of_labelled_boxes_on_lines():
    text = ("<answer>Objects found:\n- **cat**: [[12, 30, 400, 512]]\n- dog - [[500, 100, 990, 900]]\n"
            "3. bird at (700, 5, 760, 60)</answer>")
    r = parse_response(text)
    assert [(b["label"], b["box_1000"]) for b in r["boxes"]] == [
        ("cat", [12, 30, 400, 512]), ("dog", [500, 100, 990, 900]), ("bird", [700, 5, 760, 60])]


def test_json_detection_style_labels():
    text = ('<answer>[{"label": "cat", "bbox_2d": [1, 2, 3, 4]}, '
            '{"bbox_2d": [5, 6, 7, 8], "label": "dog"}]</answer>')
    r = parse_response(text)
    assert [(b["label"], b["box_1000"]) for b in r["boxes"]] == [("cat", [1, 2, 3, 4]), ("dog", [5, 6, 7, 8])]


def test_long_sentence_gives_no_label():
    b = one_box("The coordinates of the second bottle of beer from the right on the table are [[97,595,179,988]].")
    assert b["box_1000"] == [97, 595, 179, 988]
    assert b["label"] is None


def test_boxes_only_come_from_the_answer():
    r = parse_response("<think>maybe [[1, 2, 3, 4]]?</think><answer>It is at [[5, 6, 7, 8]]</answer>")
    assert [b["box_1000"] for b in r["boxes"]] == [[5, 6, 7, 8]]


# ---------------------------------------------------------------------------------------------------------------
# Points.


def test_points():
    text = "<answer>Click [512, 300]. The eyes: [[100, 200], [150, 210]]. In prose (3, 4) is not a point.</answer>"
    r = parse_response(text)
    assert r["boxes"] == []
    assert [p["point_1000"] for p in r["points"]] == [[512, 300], [100, 200], [150, 210]]
    assert [p["label"] for p in r["points"]] == ["Click", "The eyes", "The eyes"]
    assert [p["text"] for p in r["points"]] == ["[512, 300]", "[100, 200]", "[150, 210]"]


def test_parenthesised_point_inside_box_tags():
    r = parse_response("The button <|begin_of_box|>(250, 750)<|end_of_box|>", image_size=(800, 600))
    assert r["answer"] == "The button (250, 750)"
    assert r["points"] == [{"point_1000": [250, 750], "point_px": [200, 450], "label": "The button", "image": 0,
                            "in_range": True, "text": "(250, 750)"}]


# ---------------------------------------------------------------------------------------------------------------
# Odd text: truncation, no tags, malformed brackets.


def test_truncated_outputs():
    # thinking cut short: no answer, no boxes
    r = parse_response("<think>Looking at the image, the box might be [[1,2,3,4]]")
    assert (r["answer"], r["boxes"]) == ("", [])
    # answer cut inside a box: the partial box is skipped
    r = parse_response("<think>t</think><answer>cat [[10, 20, 30")
    assert (r["answer"], r["boxes"]) == ("cat [[10, 20, 30", [])
    # answer cut after the first box
    r = parse_response("<think>t</think><answer>cat [[10,20,30,40]], dog [[50,")
    assert [(b["label"], b["box_1000"]) for b in r["boxes"]] == [("cat", [10, 20, 30, 40])]
    # box tag opened but never closed
    r = parse_response("<answer><|begin_of_box|>[[11, 22, 33, 44]]")
    assert r["answer"] == "[[11, 22, 33, 44]]"
    assert r["boxes"][0]["box_1000"] == [11, 22, 33, 44]


def test_no_tags_at_all():
    r = parse_response("[[1,2,3,4]]")
    assert r["thinking"] == ""
    assert r["answer"] == "[[1,2,3,4]]"
    assert r["boxes"][0]["box_1000"] == [1, 2, 3, 4]


def test_nested_box_tags():
    r = parse_response("<answer><|begin_of_box|><|begin_of_box|>[[1,2,3,4]]<|end_of_box|><|end_of_box|></answer>")
    assert r["answer"] == "[[1,2,3,4]]"
    assert [b["box_1000"] for b in r["boxes"]] == [[1, 2, 3, 4]]
    r = parse_response("<|begin_of_box|>outer <|begin_of_box|>(5, 6)<|end_of_box|><|end_of_box|>")
    assert r["answer"] == "outer (5, 6)"
    assert [p["point_1000"] for p in r["points"]] == [[5, 6]]


@pytest.mark.parametrize("text", [
    "[1, 2, x, 4]",            # a word inside
    "[1,2,3,4)",               # mismatched closer
    "(1, 2, 3]",               # mismatched closer
    "[1, 2, 3]",               # three numbers
    "[]  [[]]  ()",            # empty groups
    "[1,2,3,4,5]",             # five numbers
    "[[[[[[",                  # only openers
    "]]]] 1, 2, 3, 4 ))",      # only closers
    "[nan, inf, 1, 2]",        # not numbers
])
def test_malformed_brackets_are_skipped(text):
    r = parse_response(text)
    assert r["boxes"] == [] and r["points"] == []
    assert r["answer"] == text.strip()


def test_malformed_around_a_good_box():
    r = parse_response("bad [1,2,3 [4, 5, 6, 7] ((( ]]] [1,2,3,4)")
    assert [b["box_1000"] for b in r["boxes"]] == [[4, 5, 6, 7]]
    r = parse_response("[[[[[[[[1,2,3,4]]]]]]]]")  # deeper than the parser goes: the innermost levels still parse
    assert [b["box_1000"] for b in r["boxes"]] == [[1, 2, 3, 4]]


def test_never_raises_on_random_text():
    rng = random.Random(0)
    alphabet = list("[](),  0123456789.-e\n") + ["<|begin_of_box|>", "<|end_of_box|>", "<answer>", "</answer>",
                                                 "<think>", "</think>", "cat", ":", "{", "}", '"label": "x"']
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        r = parse_response(text, image_size=(640, 480))
        assert isinstance(r["answer"], str) and isinstance(r["boxes"], list) and isinstance(r["points"], list)
        for b in r["boxes"]:
            assert len(b["box_1000"]) == 4
            if b["box_px"] is not None:
                assert all(0 <= v <= 640 for v in b["box_px"][0::2]) and all(0 <= v <= 480 for v in b["box_px"][1::2])
    assert parse_response(None)["answer"] == "None"  # not even for a non-string


# ---------------------------------------------------------------------------------------------------------------
# Pixels.


def test_pixels_non_square_original():
    # 1920 x 1080: x scales by 1.92, y by 1.08
    b = one_box("<answer>car [[100, 200, 300, 400]]</answer>", image_size=(1920, 1080))
    assert b["box_1000"] == [100, 200, 300, 400]
    assert b["box_px"] == [192, 216, 576, 432]
    # portrait 480 x 640
    b = one_box("[[0, 500, 1000, 1000]]", image_size=(480, 640))
    assert b["box_px"] == [0, 320, 480, 640]


def test_pixel_rounding_half_up():
    # (3, 5): 500 -> 1.5 -> 2; 100 -> 0.5 -> 1; 1000 -> 3 and 5
    assert one_box("[500, 100, 1000, 1000]", image_size=(3, 5))["box_px"] == [2, 1, 3, 5]
    # floats on 640 x 480: 333.3 -> 213.312 -> 213; 999.9 -> 639.936 -> 640; 500 -> 240
    assert one_box("[333.3, 0, 999.9, 500]", image_size=(640, 480))["box_px"] == [213, 0, 640, 240]


def test_out_of_range_is_flagged_without_pixels():
    r = parse_response("a [[0, 0, 1200, 500]] b [[-5, 10, 20, 30]] c [[0, 0, 1000, 1000]]", image_size=(100, 50))
    assert [(b["label"], b["in_range"], b["box_px"]) for b in r["boxes"]] == [
        ("a", False, None), ("b", False, None), ("c", True, [0, 0, 100, 50])]
    r = parse_response("[1001, 5]", image_size=(100, 50))
    assert r["points"][0]["in_range"] is False and r["points"][0]["point_px"] is None


def test_several_images():
    sizes = [(640, 480), (200, 100)]
    text = ("<answer>The cat: [[0, 0, 500, 500]]\nIn image 2, the dog: [[0, 0, 500, 500]]\n"
            "Image 3 does not exist: [[0, 0, 1000, 1000]]</answer>")
    r = parse_response(text, image_size=sizes)
    assert [(b["label"], b["image"], b["box_px"]) for b in r["boxes"]] == [
        ("The cat", 0, [0, 0, 320, 240]),
        ("the dog", 1, [0, 0, 100, 50]),
        ("Image 3 does not exist", 0, [0, 0, 640, 480]),
    ]
    # Chinese mention
    r = parse_response("图2中的猫：[[0, 0, 1000, 1000]]", image_size=sizes)
    assert r["boxes"][0]["image"] == 1 and r["boxes"][0]["box_px"] == [0, 0, 200, 100]
    # one size: mentions are ignored
    assert one_box("In image 2: [[0, 0, 1000, 1000]]", image_size=(10, 20))["image"] == 0


@pytest.mark.parametrize("bad", [(0, 10), (10, -1), ("a", "b"), 5, [(1, 2, 3)]])
def test_bad_image_size_raises(bad):
    with pytest.raises((ValueError, TypeError)):
        parse_response("[[1, 2, 3, 4]]", image_size=bad)


# ---------------------------------------------------------------------------------------------------------------
# boxed, strip_thinking, history_text.


def test_boxed():
    assert boxed("a <|begin_of_box|> 1 <|end_of_box|> b <|begin_of_box|>[[1,2,3,4]]<|end_of_box|>") == [
        "1", "[[1,2,3,4]]"]


@pytest.mark.parametrize("text,stripped,history", [
    ("<think>plan</think><answer>A cat.</answer>", "<answer>A cat.</answer>", "<answer>A cat.</answer>"),
    ("<think>plan</think><answer>A cat.", "<answer>A cat.", "<answer>A cat.</answer>"),  # </answer> skipped
    ("<think>plan cut short", "", ""),
    ("plan</think><answer>B", "<answer>B", "<answer>B</answer>"),
    ("no tags", "no tags", "no tags"),
    ("<think>a</think>\n<answer>x</answer>\n", "<answer>x</answer>", "<answer>x</answer>"),
])
def test_strip_thinking_and_history_text(text, stripped, history):
    assert strip_thinking(text) == stripped
    assert history_text(text) == history
