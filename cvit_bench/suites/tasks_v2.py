"""cvit-v2's task kinds that differ from cvit-v1's generator (which stays byte-identical, being cvit-v1's recipe).

``mcq-listed``: ScienceQA-shaped multiple choice whose four options are listed in one fixed order
per question type. With options shuffled per item (cvit-v1's ``mcq``) the letter is a pointer from
the image's answer to its place in the list; the 1.7 M-parameter base never learns that pointer:
full fine-tuning on the task alone memorised its 600 items (training loss 0.07) and stayed at
chance on the test set (26.5 % after 1500 steps), and 2000 more base steps on letter items, half of
them naming the answer in the text, left letter answers at chance (30-34 %). Listed in a fixed
order, the letter is a function of the image and the question, as a label is, and the task still
asks for the letter form against options shown with the image.
"""
from __future__ import annotations

import random

from cvit_bench.suites import synthetic
from cvit_bench.suites.synthetic import COLOURS, SHAPES, Sample, _plain, _scatter

KIND_MCQ = "mcq-listed"
COLOUR_OPTIONS = ("red", "green", "blue", "yellow")
SHAPE_OPTIONS = ("circle", "square", "triangle", "star")
TASK_KINDS: tuple[str, ...] = (*synthetic.TASK_KINDS, KIND_MCQ)  # every kind a synthetic suite may name


def _build_mcq_listed(rng: random.Random, index: int) -> Sample:
    """A shape (and sometimes a second, distinct in name and colour) asked about by colour or by name."""
    qtype = ("colour", "shape")[index % 2]
    target = (rng.choice(SHAPES), rng.choice(COLOUR_OPTIONS)) if qtype == "colour" else (rng.choice(SHAPE_OPTIONS), rng.choice(tuple(COLOURS)))
    specs = [target]
    if rng.random() < 0.5:
        specs.append((rng.choice([s for s in SHAPES if s != target[0]]), rng.choice([c for c in COLOURS if c != target[1]])))
    shapes = _scatter(rng, specs, sizes=(14, 26))
    name, colour = target
    if qtype == "colour":
        text, correct, options = f"What is the colour of the {name}?", colour, COLOUR_OPTIONS
    else:
        text, correct, options = f"Which shape is {colour}?", name, SHAPE_OPTIONS
    letter = "ABCD"[options.index(correct)]
    question = text + "".join(f"\n{tag}. {option}" for tag, option in zip("ABCD", options))
    return Sample(_plain(rng, shapes), question, letter, [letter], {"qtype": qtype}, {"options": list(options)})


synthetic._BUILDERS[KIND_MCQ] = _build_mcq_listed
