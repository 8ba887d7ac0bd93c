"""Language metrics (DriveLM / EM-VLM4AD: BLEU-4, METEOR, ROUGE-L, CIDEr) and driving metrics (OWLed paper style).

Tokenisation for the language metrics: lower case, every character that is not a letter, digit or space
becomes a space, then whitespace split (the COCO PTB tokenizer needs Java; this is close to it for our
answers). BLEU-4, ROUGE-L and CIDEr are pycocoevalcap's scorers called one by one (COCO scale 0-1; CIDEr 0-10,
with IDF from the evaluated corpus). METEOR is NLTK's: exact, Porter-stem and WordNet-synonym matching when
scripts/setup.sh could install WordNet 3.0 from Debian's wordnet-base into <venv>/share/wordnet, else exact and
stem only (`METEOR_SYNONYMS` says which; the Java METEOR 1.5 also has paraphrase tables).
"""
import contextlib
import functools
import io
import math
import re
import sys
import warnings
from pathlib import Path

import nltk
from nltk.corpus.reader.wordnet import WordNetCorpusReader

from nltk.translate.meteor_score import meteor_score
from pycocoevalcap.bleu import bleu_scorer
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider import cider_scorer
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge


WORDNET_DIR = Path(sys.prefix) / "share" / "wordnet"


class _NoWordNet:
    def synsets(self, *_, **__):
        return []


class _WordNet30(WordNetCorpusReader):
    """The WordNet 3.0 database files read directly. NLTK would map them onto its own downloadable 'wordnet'
    corpus (used only for multilingual data); they are WordNet 3.0 already."""

    def map_wn(self, version="wordnet"):
        return None


@functools.lru_cache(maxsize=1)
def wordnet():
    if not METEOR_SYNONYMS:
        return _NoWordNet()
    nltk.data.path.append(str(WORDNET_DIR.parent))  # NLTK reads corpora only below its data paths
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": not used
        return _WordNet30(str(WORDNET_DIR), None)


METEOR_SYNONYMS = (WORDNET_DIR / "lexnames").is_file()


def tokenize(text):
    return re.sub(r"[^a-z0-9 ]", " ", text.lower()).split()


@functools.lru_cache(maxsize=100_000)
def sentence_meteor(hypothesis, reference):
    """METEOR of one answer (the corpus value is their mean); cached, as bootstrap resamples repeat answers."""
    return meteor_score([tokenize(reference)], tokenize(hypothesis), wordnet=wordnet())


def language_metrics(hypotheses, references, meteor=True):
    """Corpus scores for lists of generated and reference answers (one reference each); METEOR (the slow one)
    only if asked."""
    if not hypotheses:
        return {"bleu4": math.nan, "meteor": math.nan, "rouge_l": math.nan, "cider": math.nan}
    hyp = {i: [" ".join(tokenize(h)) or "<empty>"] for i, h in enumerate(hypotheses)}
    ref = {i: [" ".join(tokenize(r))] for i, r in enumerate(references)}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap prints its internals
        bleu, _ = Bleu(4).compute_score(ref, hyp)
    rouge, _ = Rouge().compute_score(ref, hyp)
    cider, _ = Cider().compute_score(ref, hyp)
    scores = {"bleu4": float(bleu[3]), "rouge_l": float(rouge), "cider": float(cider)}
    if meteor:
        scores["meteor"] = sum(sentence_meteor(h, r) for h, r in zip(hypotheses, references)) / len(hypotheses)
    return scores


class CorpusResamples:
    """BLEU-4 and CIDEr of resamples of one corpus of (hypothesis, reference) pairs, equal to language_metrics'
    (pycocoevalcap's scorers fed the same pairs), with each pair's n-grams counted once rather than once per
    resample of a bootstrap."""

    def __init__(self, hypotheses, references):
        hyp = [" ".join(tokenize(h)) or "<empty>" for h in hypotheses]
        ref = [" ".join(tokenize(r)) for r in references]
        self.bleu_refs = [bleu_scorer.cook_refs([r]) for r in ref]
        self.bleu_tests = [bleu_scorer.cook_test(h, r) for h, r in zip(hyp, self.bleu_refs)]
        self.cider_refs = [cider_scorer.cook_refs([r]) for r in ref]
        self.cider_tests = [cider_scorer.cook_test(h) for h in hyp]

    def __call__(self, chosen):
        """(BLEU-4, CIDEr) of the pairs at the indices `chosen` (repeats allowed)."""
        bleu = bleu_scorer.BleuScorer(n=4)
        bleu.crefs, bleu.ctest = [self.bleu_refs[i] for i in chosen], [self.bleu_tests[i] for i in chosen]
        cider = cider_scorer.CiderScorer(n=4, sigma=6.0)
        cider.crefs, cider.ctest = [self.cider_refs[i] for i in chosen], [self.cider_tests[i] for i in chosen]
        return float(bleu.compute_score(option="closest")[0][3]), float(cider.compute_score()[0])


def mean_absolute_error(predicted, truth):
    """MAE over pairs whose prediction was parsed; unparsed predictions count as 0 objects."""
    pairs = [(p if p is not None else 0, t) for p, t in zip(predicted, truth)]
    return sum(abs(p - t) for p, t in pairs) / len(pairs) if pairs else math.nan


def accuracy(predicted, truth):
    return sum(p == t for p, t in zip(predicted, truth)) / len(truth) if truth else math.nan
