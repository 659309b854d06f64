"""Visual-understanding scorers: pure functions from model outputs and samples to scores.

Answer matching is the least documented part of published CVIT numbers, so every rule here is
named, follows a public reference implementation, and says which one. Visual understanding is
scored leniently (the answer is extracted from chatty or JSON output); whether the output kept
its required format is the separate instruction-following check in `contracts.py`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache, partial
from typing import Any

import numpy as np
from rapidfuzz import fuzz

from cvit_bench.evaluation import mllm_cl

# ---------------------------------------------------------------------------------------------
# VQA answer normalization, after the official VQA evaluation script (vqaEval.py,
# GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation).
# ---------------------------------------------------------------------------------------------

_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!")  # fmt: skip
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The script's periodStrip is "(?!<=\d)(\.)(?!\d)"; its first group is a look-ahead (a typo for a
# look-behind) that can never fail in front of a ".", so in effect: drop a "." not before a digit.
# (The script also passes re.UNICODE as `count`, stopping after 32 periods; not copied.)
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
# Verbatim from the script, quirks included ("somebody'd" -> "somebodyd"; the capitalised keys
# never match because words are lower-cased first).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip

VQA_VARIANTS = ("vqaeval", "normalized")


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    # A mark touching a space (or any text with a digit-comma-digit) is deleted, otherwise it
    # becomes a space: "a,b" -> "a b" but "a, b" -> "a b" too, and "1,000" -> "1000".
    delete = _COMMA_STRIP.search(text) is not None
    out = text
    for mark in _PUNCT:
        if delete or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = (_NUMBER_WORDS.get(word, word) for word in text.lower().split())
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """The VQA evaluation script's answer normalization.

    Whitespace cleanup, punctuation removal, number words to digits, articles dropped,
    contractions restored, lower case: "Two dogs!" -> "2 dogs".
    """
    return _process_digit_article(_process_punctuation(_clean_whitespace(text)))


def vqa_accuracy(prediction: str, answers: list[str], variant: str = "normalized") -> float:
    """Soft VQA accuracy: min(#matching annotators / 3, 1), averaged over leave-one-out subsets.

    `"vqaeval"` is vqaEval.py's behaviour: both sides only get whitespace cleanup, and the full
    normalization is applied to prediction and answers only when the annotators disagree (so a
    prediction "yes." against ten "yes" scores 0). `"normalized"` always normalizes both sides,
    as common evaluation toolkits do. With n answers the n subsets of n - 1 are averaged.
    """
    if variant not in VQA_VARIANTS:
        raise ValueError(f"unknown VQA variant {variant!r}; valid variants: {', '.join(VQA_VARIANTS)}")
    if len(answers) < 2:
        raise ValueError(f"VQA accuracy needs at least 2 annotator answers, got {len(answers)}")
    pred = _clean_whitespace(prediction)
    gts = [_clean_whitespace(answer) for answer in answers]
    if variant == "normalized" or len(set(gts)) > 1:
        pred = normalize_answer(pred)
        gts = [normalize_answer(gt) for gt in gts]
    matches = [gt == pred for gt in gts]
    total = sum(matches)
    return sum(min(1.0, (total - left_out) / 3) for left_out in matches) / len(gts)


# ---------------------------------------------------------------------------------------------
# Lenient answer extraction for visual understanding.
# ---------------------------------------------------------------------------------------------

_ANSWER_PREFIX = re.compile(r"^(?:the\s+answer\s+is\s*:?|answer\s*:)\s*", re.IGNORECASE)


def extract_answer(output: str) -> str:
    """The answer inside a possibly chatty output, lower-cased.

    Takes `{"answer": ...}` JSON apart, drops a leading "The answer is" / "Answer:" and one
    trailing ".", so a model that answers right in the wrong format still gets VU credit.
    """
    return _unwrap_answer(output).lower()


def _unwrap_answer(output: str) -> str:
    """`extract_answer` with the case kept (option letters are upper-case only)."""
    text = output.strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("answer"), (str, int, float)):
            text = str(parsed["answer"]).strip()
    text = _ANSWER_PREFIX.sub("", text)
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


# Upper-case letters only: a lower-case "a" is as likely the article as option A.
_BARE_LETTER = re.compile(r"\(?([A-Z])\)?[.:)]?")  # "B", "B.", "(B)", "B)"
_LEADING_LETTER = re.compile(r"\(?([A-Z])[.:)]\s")  # "B) blue", "(B) blue", "B. blue"
# "The answer is B", "... is (B).", "... is B, blue"; not "The answer is A cat".
_STATED_LETTER = re.compile(r"(?i:answer\s+is)\s*:?\s*\(?([A-Z])(?:[).:,]|$)")
_OPTION_TEXT_MIN_RATIO = 85.0


def extract_option_letter(output: str, options: list[str]) -> str | None:
    """The option letter an output chose, or None when it chose none of `options`.

    Reads "B", "B.", "(B)", "B) blue", "The answer is B", `{"answer": "B"}`, "Answer: B", and
    otherwise the option text itself (rapidfuzz `fuzz.ratio` >= 85 against each option, best
    match wins).
    """
    letters = [chr(ord("A") + i) for i in range(len(options))]
    text, unwrapped = output.strip(), _unwrap_answer(output)
    for match in (
        _BARE_LETTER.fullmatch(text),
        _BARE_LETTER.fullmatch(unwrapped),
        _LEADING_LETTER.match(text),
        _STATED_LETTER.search(text),
    ):
        if match and match.group(1) in letters:
            return match.group(1)
    answer = unwrapped.lower()
    ratios = [fuzz.ratio(answer, option.strip().lower()) for option in options]
    if ratios and max(ratios) >= _OPTION_TEXT_MIN_RATIO:
        return letters[ratios.index(max(ratios))]
    return None


# ---------------------------------------------------------------------------------------------
# Per-sample scorers: (output, sample) -> score in [0, 1].
# ---------------------------------------------------------------------------------------------

_LABEL_MIN_RATIO = 90.0


def option_letter_score(output: str, sample: dict) -> float:
    """Multiple choice (ScienceQA-style): 1.0 when the extracted letter is the answer letter."""
    return float(extract_option_letter(output, sample["options"]) == sample["answer"].strip())


def exact_match_score(output: str, sample: dict) -> float:
    """GQA-style exact match after VQA normalization of both sides."""
    return float(normalize_answer(extract_answer(output)) == normalize_answer(sample["answer"]))


def label_match_score(output: str, sample: dict) -> float:
    """Classification label match that forgives typos: exact after normalization, or
    rapidfuzz `fuzz.ratio` >= 90 ("golden retreiver" still names the golden retriever)."""
    prediction = normalize_answer(extract_answer(output))
    label = normalize_answer(sample["answer"])
    return float(prediction == label or fuzz.ratio(prediction, label) >= _LABEL_MIN_RATIO)


def substring_match_score(output: str, sample: dict) -> float:
    """SMoLoRA's ImageNet/Places365 rule: the lower-cased prediction is a substring of the label
    or the label of the prediction. SMoLoRA counts an empty prediction as right; here it is not."""
    prediction = output.strip().lower()
    label = sample["answer"].strip().lower()
    return float(bool(prediction) and (prediction in label or label in prediction))


def substring_match_cased_score(output: str, sample: dict) -> float:
    """CoIN's ImageNet rule: ``substring_match`` without lower-casing (its eval_ImagetNet.py compares case-sensitively)."""
    prediction, label = output.strip(), sample["answer"].strip()
    return float(bool(prediction) and (prediction in label or label in prediction))


def lower_exact_match_score(output: str, sample: dict) -> float:
    """CoIN's OCR-VQA rule: lower-cased prediction equals the lower-cased answer (no other normalization)."""
    return float(output.strip().lower() == sample["answer"].strip().lower())


def upper_exact_match_score(output: str, sample: dict) -> float:
    """SMoLoRA's VQAv2/VizWiz rule: upper-cased prediction equals the one stored answer."""
    return float(output.strip().upper() == sample["answer"].strip().upper())


def vqa_score(output: str, sample: dict, variant: str = "normalized") -> float:
    """Soft VQA accuracy of the extracted answer against the sample's annotator answers."""
    return vqa_accuracy(extract_answer(output), sample["answers"], variant)


_BOX = re.compile(r"({0})\s*,\s*({0})\s*,\s*({0})\s*,\s*({0})".format(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"))


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first four comma-separated numbers in `text` as (x1, y1, x2, y2), or None.

    Lenient (brackets optional, surrounding words ignored); the `bbox` contract is the strict form.
    """
    match = _BOX.search(text)
    if match is None:
        return None
    x1, y1, x2, y2 = (float(value) for value in match.groups())
    return x1, y1, x2, y2


def box_iou(a: tuple[float, ...] | list[float], b: tuple[float, ...] | list[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; degenerate boxes have area 0."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = inter_w * inter_h
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - intersection
    return intersection / union if union > 0 else 0.0


def grounding_score(output: str, sample: dict, strict: bool = False) -> float:
    """RefCOCO-style grounding: 1.0 when the parsed box has IoU >= 0.5 with the target box (> 0.5 if ``strict``, CoIN's rule)."""
    box = parse_box(output)
    if box is None:
        return 0.0
    iou = box_iou(box, sample["box"])
    return float(iou > 0.5 if strict else iou >= 0.5)


# ---------------------------------------------------------------------------------------------
# Caption metrics (pycocoevalcap, corpus level).
# ---------------------------------------------------------------------------------------------

SPICE_SKIP_REASON = "SPICE needs Stanford CoreNLP jars that cannot be downloaded here"


@dataclass
class CaptionScores:
    """Per-sample CIDEr (pycocoevalcap's scale; x100 is the caller's) plus corpus metrics.

    Metrics that could not run are named in `skipped` with the reason, never silently absent.
    """

    per_sample_cider: list[float]
    corpus: dict[str, float]
    skipped: dict[str, str] = field(default_factory=dict)


def _ptb_tokenize(
    predictions: list[str], references: list[list[str]]
) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """Tokenize both sides in one Java call (PTBTokenizer: lower case, punctuation dropped).

    Whitespace runs are collapsed first: a stray "\\r" or line separator inside a caption would
    otherwise split a line in the Java tokenizer and misalign every caption after it.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions: dict[tuple[str, int], list[dict[str, str]]] = {}
    for i, (prediction, refs) in enumerate(zip(predictions, references)):
        captions[("res", i)] = [{"caption": " ".join(prediction.split())}]
        captions[("gts", i)] = [{"caption": " ".join(ref.split())} for ref in refs]
    with _java_stderr_silenced():
        tokens = PTBTokenizer().tokenize(captions)
    n = len(predictions)
    return ({i: tokens[("gts", i)] for i in range(n)}, {i: tokens[("res", i)] for i in range(n)})


@contextlib.contextmanager
def _java_stderr_silenced() -> Iterator[None]:
    """PTBTokenizer's Java process prints a throughput line to the inherited stderr on every call,
    which would flood the progress display; point file descriptor 2 at /dev/null meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cider(gts: dict[int, list[str]], res: dict[int, list[str]]) -> list[float]:
    """pycocoevalcap CIDEr-D per sample; all zeros when the references hold no token at all,
    where pycocoevalcap would fail on an empty document-frequency table (e.g. SMoLoRA's swapped
    call when every prediction is empty)."""
    from pycocoevalcap.cider.cider import Cider

    if not any(ref.split() for refs in gts.values() for ref in refs):
        return [0.0] * len(gts)
    _, scores = Cider().compute_score(gts, res)
    return [float(score) for score in scores]


def _check_caption_inputs(predictions: list[str], references: list[list[str]]) -> None:
    if not predictions:
        raise ValueError("no predictions to score")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if any(not refs for refs in references):
        raise ValueError("every prediction needs at least one reference caption")


def _spice_jars_present() -> bool:
    """pycocoevalcap's Spice() downloads Stanford CoreNLP when its jars are missing: never let it."""
    from pycocoevalcap import spice as spice_module

    lib = os.path.join(os.path.dirname(spice_module.__file__), "lib")
    jars = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
    return all(os.path.exists(os.path.join(lib, jar)) for jar in jars)


def _spice(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    from pycocoevalcap.spice.spice import Spice

    score, _ = Spice().compute_score(gts, res)
    return float(score)


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    return _meteor_scores(gts, res)[0]


@cache
def _meteor_tool() -> Any:
    """One METEOR Java process per Python process: starting one loads its paraphrase table (about 5 s), and
    each call sends its own segments and aggregate, so nothing carries over between sets."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def _meteor_scores(gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[float, list[float]]:
    """METEOR of the corpus (the Java tool's aggregate, not the mean of the segments) and of each sample."""
    scorer = _meteor_tool()
    try:
        score, scores = scorer.compute_score(gts, res)
    except BaseException:
        _meteor_tool.cache_clear()  # the process may be mid-reply: the next call starts a fresh one
        raise
    finally:
        # Meteor.compute_score holds a lock it never releases on error, and Meteor.__del__ waits
        # on that lock: release it so a failed METEOR cannot hang garbage collection.
        if scorer.lock.locked():
            scorer.lock.release()
    return float(score), [float(value) for value in scores]


def caption_scores(
    predictions: list[str], references: list[list[str]], *, meteor: bool = False
) -> CaptionScores:
    """Corpus caption metrics with pycocoevalcap: CIDEr (per sample and corpus), BLEU-4, ROUGE-L,
    METEOR when asked (slow: it loads a paraphrase table), SPICE when its jars exist.

    CIDEr's idf comes from the whole reference corpus, so scores depend on the batch scored
    together (a corpus of one caption scores 0); corpus CIDEr is the mean of the per-sample ones.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge

    _check_caption_inputs(predictions, references)
    gts, res = _ptb_tokenize(predictions, references)
    per_sample = _cider(gts, res)
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its length ratio
        bleu, _ = Bleu(4).compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    corpus = {"CIDEr": sum(per_sample) / len(per_sample), "BLEU-4": float(bleu[3]), "ROUGE-L": float(rouge)}
    skipped: dict[str, str] = {}
    optional: dict[str, Callable[[dict, dict], float]] = {}
    if meteor:
        optional["METEOR"] = _meteor
    if _spice_jars_present():
        optional["SPICE"] = _spice
    else:
        skipped["SPICE"] = SPICE_SKIP_REASON
    for name, scorer in optional.items():
        try:
            corpus[name] = scorer(gts, res)
        except Exception as error:  # noqa: BLE001 - an optional metric must not sink the others
            skipped[name] = f"{name} failed: {error!r}"
    return CaptionScores(per_sample, corpus, skipped)


CAPTION_MEAN_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def caption_mean_scores(predictions: list[str], references: list[list[str]]) -> TaskScores:
    """UCIT's caption score: the mean of BLEU-1..4, METEOR, ROUGE-L and CIDEr as pycocoevalcap's COCOEvalCap
    computes them over the whole set (PTB tokenizer, SPICE left out), HiDe-LLaVA's eval_caption.py.

    Prediction i is scored against references i, so both lists must keep the test file's order. BLEU and METEOR
    are corpus statistics with no exact per-sample split: each sample's value is the mean of its own seven
    per-sample scores, shifted by one constant so that their mean is the corpus score. The set's mean (what the
    matrix records) is then exactly UCIT's number; the shift only touches the spread the bootstrap interval reads.
    ``corpus`` holds the seven metrics and their mean (``caption_mean``).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge

    _check_caption_inputs(predictions, references)
    gts, res = _ptb_tokenize(predictions, references)
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its length ratio
        bleu, bleu_per_sample = Bleu(4).compute_score(gts, res)
    meteor, meteor_per_sample = _meteor_scores(gts, res)
    rouge, rouge_per_sample = Rouge().compute_score(gts, res)
    cider_per_sample = _cider(gts, res)
    per_metric = [*bleu_per_sample, meteor_per_sample, list(rouge_per_sample), cider_per_sample]
    corpus_values = [*bleu, meteor, rouge, float(np.mean(cider_per_sample))]
    corpus = {name: float(value) for name, value in zip(CAPTION_MEAN_METRICS, corpus_values)}
    corpus["caption_mean"] = float(np.mean(corpus_values))
    own = np.mean(np.asarray(per_metric, dtype=float), axis=0)
    per_sample = own + (corpus["caption_mean"] - own.mean())
    return TaskScores([float(value) for value in per_sample], corpus, {"SPICE": "left out of UCIT's caption score"})


def cider_single_reference_scores(predictions: list[str], references: list[list[str]]) -> list[float]:
    """Per-sample CIDEr as SMoLoRA's Flickr30k script computes it (eval_flickr30k_cider.py).

    For each sample it keeps only the reference that scores best against the prediction
    (CIDEr over a mini-corpus of that sample's references, first one on ties), then scores the
    whole set with the arguments swapped, as its call does: the predictions act as references
    and the chosen references as candidates. Swapping changes CIDEr-D in two ways: the idf is
    counted over the predictions, and the clipped n-gram product is weighted by the prediction's
    vector. The one deliberate difference: text is PTB-tokenized here like every caption metric,
    where SMoLoRA splits raw text on spaces (so "Dog." and "dog" differ there).
    """
    _check_caption_inputs(predictions, references)
    gts, res = _ptb_tokenize(predictions, references)
    best: dict[int, list[str]] = {}
    for i, refs in gts.items():
        one_each = {j: [ref] for j, ref in enumerate(refs)}
        scores = _cider(one_each, {j: res[i] for j in one_each})
        best[i] = [refs[int(np.argmax(scores))]]
    return _cider(res, best)


_CIDER_N, _CIDER_SIGMA = 4, 6.0  # pycocoevalcap's CIDEr-D settings


def _ngram_counts(text: str) -> list[Counter]:
    """Counts of the 1- to 4-grams of a tokenized text, one Counter per n (pycocoevalcap's ``precook``, split by n)."""
    words = text.split()
    return [Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1)) for n in range(1, _CIDER_N + 1)]


def constant_reply_cider(candidates: list[str], references: list[list[str]]) -> list[float]:
    """Corpus CIDEr-D of each candidate given as the reply to every sample (the mean of per-sample scores, as
    ``caption_scores``), for an image-blind chance level.

    pycocoevalcap scores one candidate against a 200-item test set in seconds, and a task's candidates
    number thousands, so its formula is evaluated here for all of them at once: tf-idf vectors with the
    idf of the references, clipped overlap min(tf_c, tf_r) * tf_r * idf^2 summed as matrix products over
    count levels, cosine per n, length penalty exp(-d^2 / 2 sigma^2) on bigram counts (pycocoevalcap's
    length), mean over n, times 10. Equal to pycocoevalcap's result (tested).
    """
    if not candidates:
        raise ValueError("no candidates to score")
    _check_caption_inputs([""] * len(references), references)
    gts, _ = _ptb_tokenize([""] * len(references), references)
    _, res = _ptb_tokenize(candidates, [[c] for c in candidates])
    items = [[_ngram_counts(ref) for ref in gts[i]] for i in range(len(references))]
    refs = [counts for item in items for counts in item]
    hyps = [_ngram_counts(res[c][0]) for c in range(len(candidates))]
    log_n = np.log(float(len(items)))
    weight = np.array([10.0 / (len(items) * len(item)) for item in items for _ in item])  # each reference's share of the mean
    similarity = np.zeros((len(hyps), len(refs)))
    for n in range(_CIDER_N):
        frequency = Counter(g for item in items for g in set().union(*(counts[n] for counts in item)))  # documents = samples
        column = {g: k for k, g in enumerate(frequency)}
        idf = log_n - np.log(np.array([float(frequency[g]) for g in column]))
        ref_tf = np.zeros((len(refs), len(column)))
        for r, counts in enumerate(refs):
            for g, count in counts[n].items():
                ref_tf[r, column[g]] = count
        hyp_tf = np.zeros((len(hyps), len(column)))
        hyp_norm = np.zeros(len(hyps))
        for c, counts in enumerate(hyps):
            for g, count in counts[n].items():
                if g in column:
                    hyp_tf[c, column[g]] = count
                else:  # absent from every reference: idf log(N), counted in the candidate's norm only
                    hyp_norm[c] += (count * log_n) ** 2
        hyp_norm = np.sqrt(hyp_norm + ((hyp_tf * idf) ** 2).sum(axis=1))
        ref_norm = np.sqrt(((ref_tf * idf) ** 2).sum(axis=1))
        overlap = sum((hyp_tf >= level).astype(float) @ ((ref_tf >= level) * ref_tf * idf ** 2).T
                      for level in range(1, int(max(hyp_tf.max(initial=0), ref_tf.max(initial=0))) + 1))
        norms = np.outer(hyp_norm, ref_norm)
        similarity += np.where(norms > 0, overlap / np.where(norms > 0, norms, 1.0), overlap) / _CIDER_N
    hyp_length = np.array([sum(counts[1].values()) for counts in hyps], dtype=float)
    ref_length = np.array([sum(counts[1].values()) for counts in refs], dtype=float)
    penalty = np.exp(-((hyp_length[:, None] - ref_length[None, :]) ** 2) / (2 * _CIDER_SIGMA ** 2))
    return [float(v) for v in (similarity * penalty) @ weight]


def reference_cider(references: list[list[str]]) -> float:
    """Mean leave-one-out CIDEr-D of the references: each reference scored as the reply against the others of
    its sample. What a reply as good as another annotator's gets, a ceiling for a CIDEr task (needs two
    references per sample)."""
    if any(len(refs) < 2 for refs in references):
        raise ValueError("a leave-one-out ceiling needs at least two references per sample")
    predictions = [ref for refs in references for ref in refs]
    others = [refs[:j] + refs[j + 1:] for refs in references for j in range(len(refs))]
    gts, res = _ptb_tokenize(predictions, others)
    return float(np.mean(_cider(gts, res)))


# ---------------------------------------------------------------------------------------------
# Registry and entry point.
# ---------------------------------------------------------------------------------------------

SAMPLE_SCORERS: dict[str, Callable[[str, dict], float]] = {
    "option_letter": option_letter_score,
    "vqa_accuracy": vqa_score,
    "vqa_accuracy_vqaeval": partial(vqa_score, variant="vqaeval"),
    "exact_match": exact_match_score,
    "label_match": label_match_score,
    "substring_match": substring_match_score,
    "substring_match_cased": substring_match_cased_score,
    "lower_exact_match": lower_exact_match_score,
    "upper_exact_match": upper_exact_match_score,
    "grounding_iou": grounding_score,
    "grounding_iou_strict": partial(grounding_score, strict=True),
    "mllm_word_or_substring": mllm_cl.word_or_substring_score,
    "mllm_contains": mllm_cl.contains_answer_score,
    "mllm_science": mllm_cl.science_score,
    "mllm_finance": mllm_cl.finance_score,
    "mllm_ocr": mllm_cl.ocr_score,
    "mllm_math_rules": mllm_cl.math_rule_score,
    "mllm_spatial": mllm_cl.spatial_score,
    "not_computed": mllm_cl.not_computed_score,
}
CORPUS_SCORERS = ("cider", "cider_single_ref", "caption_mean")

def _letter(output: str, sample: dict) -> str | None:
    return extract_option_letter(output, sample["options"])


def _unwrapped(output: str, sample: dict) -> str:
    return extract_answer(output)


def _normalized(output: str, sample: dict) -> str:
    return normalize_answer(extract_answer(output))


def _stripped(output: str, sample: dict) -> str:
    return output.strip()


def _lower(output: str, sample: dict) -> str:
    return output.strip().lower()


def _upper(output: str, sample: dict) -> str:
    return output.strip().upper()


def _box(output: str, sample: dict) -> tuple[float, float, float, float] | None:
    return parse_box(output)


# What each scorer reads out of a reply before comparing it (recorded beside the raw reply in predictions.jsonl).
ANSWER_EXTRACTORS: dict[str, Callable[[str, dict], Any]] = {
    "option_letter": _letter,
    "vqa_accuracy": _unwrapped,
    "vqa_accuracy_vqaeval": _unwrapped,
    "exact_match": _normalized,
    "label_match": _normalized,
    "substring_match": _lower,
    "substring_match_cased": _stripped,
    "lower_exact_match": _lower,
    "upper_exact_match": _upper,
    "grounding_iou": _box,
    "grounding_iou_strict": _box,
    "cider": _stripped,
    "cider_single_ref": _stripped,
    "caption_mean": _stripped,
    "mllm_word_or_substring": _lower,
    "mllm_contains": _lower,
    "mllm_science": _lower,
    "mllm_finance": _lower,
    "mllm_ocr": _stripped,
    "mllm_math_rules": _stripped,
    "mllm_spatial": _lower,
    "not_computed": _stripped,
}


def extracted_answer(scorer: str, output: str, sample: dict) -> Any:
    """The answer ``scorer`` compares, as read from ``output`` (an option letter, a normalized string, a box, or None)."""
    return ANSWER_EXTRACTORS[scorer](output, sample)


@dataclass
class TaskScores:
    """One task's scores: per sample (in [0, 1], or CIDEr for caption scorers), corpus-level
    extras (BLEU-4, ROUGE-L, CIDEr for captions) and metrics skipped with their reasons."""

    per_sample: list[float]
    extra: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def score_task(scorer: str, outputs: list[str], samples: list[dict]) -> TaskScores:
    """Score a task's outputs with a named scorer (see SAMPLE_SCORERS and CORPUS_SCORERS).

    Caption scorers read the references from each sample's "answers".
    """
    if len(outputs) != len(samples):
        raise ValueError(f"{len(outputs)} outputs but {len(samples)} samples")
    if scorer in SAMPLE_SCORERS:
        score = SAMPLE_SCORERS[scorer]
        return TaskScores([score(output, sample) for output, sample in zip(outputs, samples)])
    if scorer not in CORPUS_SCORERS:
        valid = ", ".join((*SAMPLE_SCORERS, *CORPUS_SCORERS))
        raise ValueError(f"unknown scorer {scorer!r}; valid scorers: {valid}")
    references = [sample["answers"] for sample in samples]
    if scorer == "cider":
        captions = caption_scores(outputs, references)
        return TaskScores(captions.per_sample_cider, captions.corpus, captions.skipped)
    if scorer == "caption_mean":
        return caption_mean_scores(outputs, references)
    per_sample = cider_single_reference_scores(outputs, references)
    return TaskScores(per_sample, {"CIDEr": sum(per_sample) / len(per_sample)})


def sample_problem(scorer: str, sample: dict) -> str | None:
    """The field that keeps ``scorer`` from scoring ``sample`` (the dict of ``Sample.scoring_fields``), or None.

    A run checks every record with this before it trains, so a record a scorer cannot read fails
    up front with its file and field instead of as an exception after hours of training.
    """
    if scorer in ("vqa_accuracy", "vqa_accuracy_vqaeval") and len(sample["answers"]) < 2:
        return f"answers: {scorer} needs at least 2 annotator answers, got {len(sample['answers'])}"
    if scorer in ("grounding_iou", "grounding_iou_strict") and len(sample["box"]) != 4:
        return f"box: {scorer} needs a box [x1, y1, x2, y2], got {list(sample['box'])}"
    return mllm_cl.problem(scorer, sample)
