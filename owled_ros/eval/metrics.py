"""Language metrics (DriveLM / EM-VLM4AD: BLEU-4, METEOR, ROUGE-L, CIDEr) and driving metrics (OWLed paper style).

Tokenisation for the language metrics: lower case, every character that is not a letter, digit or space
becomes a space, then whitespace split (the COCO PTB tokenizer needs Java; this is close to it for our
answers). BLEU-4, ROUGE-L and CIDEr are pycocoevalcap's scorers called one by one (COCO scale 0-1; CIDEr 0-10,
with IDF from the evaluated corpus). METEOR is NLTK's with exact and Porter-stem matching only: the WordNet
synonym stage needs a corpus download, so it is off (documented difference from the Java METEOR 1.5).
"""
import contextlib
import io
import math
import re

from nltk.translate.meteor_score import meteor_score
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge


class _NoWordNet:
    def synsets(self, *_, **__):
        return []


def tokenize(text):
    return re.sub(r"[^a-z0-9 ]", " ", text.lower()).split()


def language_metrics(hypotheses, references):
    """Corpus scores for lists of generated and reference answers (one reference each)."""
    if not hypotheses:
        return {"bleu4": math.nan, "meteor": math.nan, "rouge_l": math.nan, "cider": math.nan}
    hyp = {i: [" ".join(tokenize(h)) or "<empty>"] for i, h in enumerate(hypotheses)}
    ref = {i: [" ".join(tokenize(r))] for i, r in enumerate(references)}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap prints its internals
        bleu, _ = Bleu(4).compute_score(ref, hyp)
    rouge, _ = Rouge().compute_score(ref, hyp)
    cider, _ = Cider().compute_score(ref, hyp)
    meteor = sum(meteor_score([tokenize(r)], tokenize(h), wordnet=_NoWordNet()) for h, r in zip(hypotheses, references))
    return {"bleu4": float(bleu[3]), "meteor": meteor / len(hypotheses), "rouge_l": float(rouge), "cider": float(cider)}


def mean_absolute_error(predicted, truth):
    """MAE over pairs whose prediction was parsed; unparsed predictions count as 0 objects."""
    pairs = [(p if p is not None else 0, t) for p, t in zip(predicted, truth)]
    return sum(abs(p - t) for p, t in pairs) / len(pairs) if pairs else math.nan


def accuracy(predicted, truth):
    return sum(p == t for p, t in zip(predicted, truth)) / len(truth) if truth else math.nan
