"""The cvit-v2 base-stage corpus: every skill answered, from the image, in every answer form.

cvit-v1's base stage answered each skill in one plain sentence after a fixed prefix and
practised the tasks' output forms (capitals, JSON, option letters) only on text copied from
the prompt, so its image-dependent replies never started with a bare word, a capitalised
label, a JSON object or a letter. The continual tasks then could not be learned from it in
150 steps: every LoRA method answered ocr and classify with the untrained base's constant
reply. Here each visual skill is asked in base-only wording and answered in one of five
forms (sentence, word, capitals, JSON, option letter) named by a terse ``Form:`` line that no
task template uses, so a task still has to learn its own instruction, but never a new way
of answering.

The kind registers itself in the generator's table rather than living in ``synthetic.py``:
that file's bytes are cvit-v1's data recipe hash, and cvit-v1 is frozen.
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable

from cvit_bench.suites import synthetic
from cvit_bench.suites.synthetic import (
    BELOW_TEXT, COLOURS, FULL, NUMBER_WORDS, OCR_ROW_TOP, PLACES, SHAPES, TEXTCAP_ROW_TOP, WORDS, Sample, Scene,
    _a, _any_background, _glyph_fields, _pair, _plain, _scatter, _shape_in, _specs, _textured, _thing,
)

KIND = "pretrain-forms"
FORMS = ("sentence", "word", "capitals", "json", "letter")
POSITIONS = ("left", "right", "top", "bottom")
COUNTS = ("1", "2", "3", "4")

# (scene, question, answer value, sentence reply, option pool)
Query = tuple[Scene, str, str, str, tuple[str, ...]]


def _shape(rng: random.Random) -> Query:
    shape = _shape_in(rng, _specs(rng, 1)[0], FULL)
    return _any_background(rng, [shape]), "Name the shape.", shape.name, f"It is {_a(shape.name)}.", SHAPES


def _colour(rng: random.Random) -> Query:
    shapes = _scatter(rng, _specs(rng, rng.randint(1, 2), distinct_names=True, distinct_colours=True), sizes=(14, 24))
    target = rng.choice(shapes)
    return (_any_background(rng, shapes), f"Name the colour of the {target.name}.", target.colour,
            f"The {target.name} is {target.colour}.", tuple(COLOURS))


def _count(rng: random.Random) -> Query:
    count = rng.randint(1, 4)
    shapes = _scatter(rng, [_specs(rng, 1)[0] for _ in range(count)])
    sentence = "There is one shape." if count == 1 else f"There are {NUMBER_WORDS[str(count)]} shapes."
    return _any_background(rng, shapes), "Count the shapes.", str(count), sentence, COUNTS


def _position(rng: random.Random) -> Query:
    vertical = rng.random() < 0.5
    first, second = _pair(rng, *_specs(rng, 2, distinct_colours=True), vertical)
    target_first = rng.random() < 0.5
    target = first if target_first else second
    where = {(False, True): "left", (False, False): "right", (True, True): "top", (True, False): "bottom"}[(vertical, target_first)]
    return (_plain(rng, [first, second]), f"Where is the {target.colour} shape?", where,
            f"It is at the {where}.", POSITIONS)


def _neighbour(rng: random.Random) -> Query:
    """The other shape of a pair, named by its relation to an anchor (GQA-like composition)."""
    vertical = rng.random() < 0.5
    first, second = _pair(rng, *_specs(rng, 2, distinct_names=True, distinct_colours=True), vertical)
    anchor_first = rng.random() < 0.5
    anchor, other = (first, second) if anchor_first else (second, first)
    relation = {(False, True): "right of", (False, False): "left of", (True, True): "below", (True, False): "above"}[(vertical, anchor_first)]
    scene = _plain(rng, [first, second])
    if rng.random() < 0.5:
        return (scene, f"Name the shape {relation} the {anchor.colour} {anchor.name}.", other.name,
                f"It is {_a(other.name)}.", SHAPES)
    return (scene, f"Name the colour of the shape {relation} the {anchor.name}.", other.colour,
            f"It is {other.colour}.", tuple(COLOURS))


def _presence(rng: random.Random) -> Query:
    shapes = _scatter(rng, _specs(rng, rng.randint(1, 3)))
    present = rng.random() < 0.5
    name, colour = synthetic._yes_no_target(rng, shapes, present)
    sentence = f"Yes, there is {_a(colour + ' ' + name)}." if present else f"No, there is no {colour} {name}."
    return (_any_background(rng, shapes), f"Is {_a(colour + ' ' + name)} present?", "yes" if present else "no",
            sentence, ("yes", "no"))


def _read(rng: random.Random) -> Query:
    word = rng.choice(WORDS)
    if rng.random() < 0.5:
        scene = _plain(rng, **_glyph_fields(rng, word, OCR_ROW_TOP))
    else:
        shape = _shape_in(rng, _specs(rng, 1)[0], BELOW_TEXT, sizes=(14, 22))
        scene = _plain(rng, [shape], **_glyph_fields(rng, word, TEXTCAP_ROW_TOP))
    return scene, "Read the text.", word, f"The text says {word}.", WORDS


def _place(rng: random.Random) -> Query:
    scene = _textured(rng, [_shape_in(rng, _specs(rng, 1)[0], FULL, sizes=(12, 16))])
    return scene, "Name the place.", scene.background, f"It is {_a(scene.background)} scene.", PLACES


_SKILLS: dict[str, Callable[[random.Random], Query]] = {
    "shape": _shape, "colour": _colour, "count": _count, "position": _position,
    "neighbour": _neighbour, "presence": _presence, "read": _read, "place": _place,
}


def _describe(rng: random.Random) -> tuple[Scene, str, str]:
    """Free description, always a sentence, in a style unlike the caption task's references."""
    shapes = sorted(_scatter(rng, _specs(rng, rng.randint(1, 2)), sizes=(14, 24)), key=lambda s: s.cx)
    return _plain(rng, shapes), "Tell me about the picture.", f"I see {' and '.join(map(_thing, shapes))}."


def _in_form(rng: random.Random, query: Query, form: str) -> tuple[str, str, dict]:
    """Prompt and reply of one query in one answer form; options are listed for the letter form."""
    _, question, value, sentence, pool = query
    cue = f"\nForm: {form}."
    if form == "sentence":
        return question + cue, sentence, {}
    if form == "word":
        return question + cue, value, {}
    if form == "capitals":
        return question + cue, value.upper(), {}
    if form == "json":
        return question + cue, json.dumps({"answer": value}), {}
    options = synthetic._options(rng, value, pool, ()) if len(pool) >= 4 else rng.sample(pool, len(pool))
    listing = "".join(f"\n{tag}. {option}" for tag, option in zip("ABCD", options))
    return question + listing + cue, "ABCD"[options.index(value)], {"options": options}


def _build(rng: random.Random, index: int) -> Sample:
    """Index i cycles through skills (and a free description) and forms, so every pairing is equally common."""
    names = (*_SKILLS, "describe")
    skill = names[index % len(names)]
    if skill == "describe":
        scene, question, reply = _describe(rng)
        return Sample(scene, question, reply, [reply], {"skill": skill, "form": "sentence"})
    form = FORMS[(index // len(names)) % len(FORMS)]
    query = _SKILLS[skill](rng)
    prompt, reply, extra = _in_form(rng, query, form)
    return Sample(query[0], prompt, reply, [reply], {"skill": skill, "form": form}, extra)


synthetic._BUILDERS[KIND] = _build
