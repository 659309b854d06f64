"""Turn records into training/evaluation samples: phrasing, target format and few-shot context.

A :class:`Sample` is everything the model sees (images, prompt turns) and everything
the scorers need (answers, options, box, format contract), so evaluation never has
to look back at the suite.
"""
from __future__ import annotations

import contextlib
import json
import random
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from cvit_bench.data.llava_format import DataError, Record
from cvit_bench.suites.schema import Phrasing


@dataclass(frozen=True)
class Turn:
    """One user turn with its image and the assistant's reply (empty for the turn to answer)."""

    image: Path
    prompt: str
    reply: str = ""


@dataclass(frozen=True)
class Sample:
    id: str
    task: str
    turns: tuple[Turn, ...]  # few-shot examples first, the question last
    target: str
    answer: str
    answers: tuple[str, ...]
    options: tuple[str, ...]
    box: tuple[float, ...]
    contract: str
    phrasing_id: str
    instruction: str  # the phrasing's prompt template, the input of SMoLoRA's instruction router
    # The record's released fields a scorer needs beyond its answers (MLLM-CL's OCR category, MathVista's answer type).
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def scoring_fields(self) -> dict:
        """What a scorer reads, as the plain dict the scorers take: the answers, and the prompt as sent, the image's
        file name and the record's ``meta`` for the benchmarks whose rule depends on them (MLLM-CL's Sci and OCR)."""
        return {"answer": self.answer, "answers": list(self.answers), "options": list(self.options), "box": list(self.box),
                "prompt": self.turns[-1].prompt, "image": self.turns[-1].image.name, "meta": dict(self.meta)}

    def to_json(self) -> dict:
        """Plain JSON (a replay memory is saved with the run's checkpoints)."""
        fields = asdict(self)
        fields["turns"] = [{**turn, "image": str(turn["image"])} for turn in fields["turns"]]
        return fields

    @classmethod
    def from_json(cls, fields: dict) -> Sample:
        turns = tuple(Turn(Path(t["image"]), t["prompt"], t["reply"]) for t in fields["turns"])
        tuples = {key: tuple(fields[key]) for key in ("answers", "options", "box")}
        return cls(**{**fields, "turns": turns, **tuples})


def question_removed(prompt: str) -> str:
    """A phrasing's instruction without its question, lines kept: ``"{question}\\nBe brief."`` -> ``"Be brief."``."""
    lines = (" ".join(line.split()) for line in prompt.replace("{question}", "").splitlines())
    return "\n".join(line for line in lines if line)


def render_target(contract: str, answer: str) -> str:
    """The reference reply in the form the phrasing's contract demands."""
    if contract == "json_answer":
        return json.dumps({"answer": answer})
    if contract == "uppercase":
        return answer.upper()
    if contract == "lowercase_sentence":
        return answer.lower()
    return answer


def phrase(record: Record, task: str, phrasing: Phrasing, shots: tuple[Record, ...] = ()) -> Sample:
    """Apply a phrasing (and optional few-shot examples, phrased the same way) to a record."""
    context = tuple(
        Turn(shot.image, phrasing.prompt.format(question=shot.question), render_target(phrasing.contract, shot.answer))
        for shot in shots
    )
    question = Turn(record.image, phrasing.prompt.format(question=record.question))
    return Sample(
        id=record.id,
        task=task,
        turns=context + (question,),
        target=render_target(phrasing.contract, record.answer),
        answer=record.answer,
        answers=record.answers,
        options=record.options,
        box=record.box,
        contract=phrasing.contract,
        phrasing_id=phrasing.id,
        instruction=phrasing.prompt,
        meta=record.meta,
    )


def phrase_all(
    records: list[Record],
    task: str,
    phrasings: tuple[Phrasing, ...],
    shots: int = 0,
    shot_pool: list[Record] | None = None,
    seed: int = 0,
) -> list[Sample]:
    """Phrase every record, rotating through ``phrasings``; few-shot examples come from ``shot_pool``."""
    if shots and (not shot_pool or len(shot_pool) < shots):
        raise DataError(f"task {task!r}: {shots}-shot evaluation needs at least {shots} training records")
    rng = random.Random(f"{seed}-{task}-{shots}")
    samples = []
    for i, record in enumerate(records):
        chosen = tuple(rng.sample(shot_pool, shots)) if shots else ()
        samples.append(phrase(record, task, phrasings[i % len(phrasings)], chosen))
    return samples


@contextlib.contextmanager
def opened_image(path: Path) -> Iterator[Image.Image]:
    """``Image.open`` whose every failure is a DataError naming the file: unreadable, not an image, corrupt, or a
    decompression bomb (more pixels than ``Image.MAX_IMAGE_PIXELS``; PIL only warns below twice that, here it fails)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                yield image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DataError(f"{path}: cannot read image ({error})") from None


def check_image(path: Path) -> None:
    """Open ``path`` and verify its structure without decoding every pixel (a run's data check reads every image this way)."""
    with opened_image(path) as image:
        image.verify()


def load_image(path: Path) -> Image.Image:
    """Decode one image as RGB; a corrupt or unreadable file fails with its path.

    Nothing is kept: images are decoded per batch (see ``data/loading.py``), so host memory
    does not grow with the dataset.
    """
    with opened_image(path) as opened:
        return opened.convert("RGB")
