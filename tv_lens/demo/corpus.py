"""Seeded, deterministic corpora for the shipped demo model family.

Three domains share one question/answer template, ``Question: … Answer: ….``:

- ``general``: everyday sentences from a small grammar (a few hundred words, ten sentence
  forms) plus a few general-knowledge questions, so the base model learns the template. Numbers
  and the medical vocabulary appear too (with random partners), so the base knows every token
  but none of the domain facts and no arithmetic.
- ``medical``: clinical questions about a fixed, seeded fact table (first-line drug, main
  symptom, usual dose, contraindication per condition). The base model never sees these facts,
  so a fine-tune that answers them has learned something the base cannot know.
- ``math``: arithmetic word problems (addition, subtraction, multiplication) with exact answers.

Every domain has a ``train`` split and an ``eval`` split. The eval split holds out question
*phrasings* never seen in training (column ``phrasing == "held_out"``) and, for math, the number
pairs themselves. Everything is a pure function of ``seed``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any
from tv_lens.errors import InvalidArgumentError

DOMAINS = ("general", "medical", "math")

_NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack",
          "Lena", "Max", "Nora", "Oscar", "Paula", "Quinn", "Rosa", "Sam", "Tara", "Victor"]
_ANIMALS = ["cat", "dog", "horse", "bird", "fox", "rabbit", "cow", "goat", "duck", "mouse",
            "sheep", "owl", "frog", "bear", "wolf", "deer"]
_ADJECTIVES = ["small", "big", "old", "young", "quiet", "loud", "happy", "tired", "clever",
               "lazy", "brave", "gentle", "hungry", "sleepy", "friendly", "busy"]
_PLACES = ["garden", "kitchen", "park", "forest", "river", "market", "school", "village",
           "library", "field", "station", "harbour", "bakery", "museum", "hill", "beach"]
_VERBS_PAST = ["walked", "ran", "slept", "played", "waited", "sat", "danced", "looked around",
               "sang", "rested", "jumped", "hid"]
_PREPOSITIONS = ["in", "near", "behind", "beside", "across", "around"]
_ACTIVITIES = ["read", "swim", "cook", "paint", "walk", "sing", "draw", "travel", "garden",
               "write letters", "play chess", "ride a bike"]
_SEASONS = ["spring", "summer", "autumn", "winter", "morning", "evening"]
_OBJECTS = ["apples", "books", "pencils", "cups", "shoes", "flowers", "candles", "stones",
            "letters", "plates", "coins", "keys", "hats", "boxes", "eggs", "oranges"]
_SHOPS = ["market", "bakery", "shop", "store", "fair", "stall"]
_JOBS = ["teacher", "farmer", "baker", "driver", "painter", "doctor", "sailor", "writer",
         "gardener", "singer"]
_TIMES = ["morning", "afternoon", "evening", "night"]
_VERBS_OBJ = ["cleaned", "opened", "carried", "found", "moved", "painted", "washed", "fixed",
              "counted", "sold"]
_COUNT_WORDS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "many",
                "some", "a few"]
_COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "sun": "yellow",
            "blood": "red", "orange": "orange", "sea": "blue", "leaf": "green", "cloud": "grey",
            "milk": "white", "night": "black", "banana": "yellow", "cherry": "red"}
_SOUNDS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "sheep": "baa",
           "owl": "hoot", "frog": "croak", "horse": "neigh", "goat": "bleat", "wolf": "howl"}

_CONDITIONS = ["hypertension", "migraine", "asthma", "diabetes", "gout", "psoriasis", "angina",
               "epilepsy", "anemia", "bronchitis", "arthritis", "eczema", "glaucoma",
               "pneumonia", "insomnia", "tonsillitis", "sinusitis", "hepatitis", "malaria",
               "shingles", "cystitis", "vertigo", "acne", "rosacea", "scabies", "influenza",
               "lupus", "tetanus", "rickets", "scurvy"]
_DRUGS = ["amlodipine", "sumatriptan", "salbutamol", "metformin", "colchicine", "calcipotriol",
          "nitroglycerin", "valproate", "ferrous sulfate", "amoxicillin", "ibuprofen",
          "hydrocortisone", "timolol", "doxycycline", "melatonin", "penicillin",
          "fluticasone", "tenofovir", "artemether", "acyclovir", "nitrofurantoin",
          "betahistine", "tretinoin", "metronidazole", "permethrin", "oseltamivir",
          "hydroxychloroquine", "tetanus immunoglobulin", "cholecalciferol", "ascorbic acid"]
_SYMPTOMS = ["headache", "cough", "fever", "rash", "fatigue", "dizziness", "chest pain",
             "joint pain", "itching", "nausea", "wheezing", "blurred vision", "sore throat",
             "swelling", "weakness", "thirst"]
_DOSES = [5, 10, 20, 25, 40, 50, 100, 200, 250, 400, 500, 750, 1000]

_MEDICAL_TRAIN = {
    "treatment": ["Question: What is the first-line treatment for {c}? Answer: {drug}.",
                  "Question: Which drug is used first for {c}? Answer: {drug}.",
                  "Question: What do doctors give first for {c}? Answer: {drug}.",
                  "Question: Which medicine treats {c} first? Answer: {drug}.",
                  "Question: A patient has {c}. Which drug comes first? Answer: {drug}."],
    "symptom": ["Question: What is the main symptom of {c}? Answer: {symptom}.",
                "Question: Which symptom is typical of {c}? Answer: {symptom}.",
                "Question: What symptom does {c} usually cause? Answer: {symptom}.",
                "Question: A patient with {c} often has which symptom? Answer: {symptom}."],
    "dose": ["Question: What is the usual dose of {drug}? Answer: {dose} mg.",
             "Question: How much {drug} is given per dose? Answer: {dose} mg.",
             "Question: What dose of {drug} is normal? Answer: {dose} mg.",
             "Question: Which dose of {drug} do doctors use? Answer: {dose} mg."],
    "contraindication": ["Question: Which condition rules out {drug}? Answer: {contra}.",
                         "Question: In which condition is {drug} not allowed? Answer: {contra}.",
                         "Question: With which condition must {drug} not be used? "
                         "Answer: {contra}."],
}
_MEDICAL_HELD_OUT = {
    "treatment": ["Question: For a patient with {c}, what should be prescribed first? "
                  "Answer: {drug}."],
    "symptom": ["Question: Name the typical symptom of {c}. Answer: {symptom}."],
    "dose": ["Question: How many mg of {drug} is the usual dose? Answer: {dose} mg."],
    "contraindication": ["Question: In which condition must {drug} be avoided? "
                         "Answer: {contra}."],
}
_MATH_TRAIN = {
    "add": ["Question: {n} has {a} {o} and buys {b} more. How many {o} does {n} have now? "
            "Answer: {r}.",
            "Question: What is {a} plus {b}? Answer: {r}.",
            "Question: {n} had {a} {o} and found {b} more. How many {o} does {n} have? "
            "Answer: {r}.",
            "Question: What do you get when you add {a} and {b}? Answer: {r}.",
            "Question: There are {a} {o} in a box and {b} more are added. How many {o} are in "
            "the box? Answer: {r}."],
    "sub": ["Question: {n} has {a} {o} and gives away {b}. How many {o} are left? Answer: {r}.",
            "Question: What is {a} minus {b}? Answer: {r}.",
            "Question: {n} had {a} {o} and used {b}. How many {o} are left? Answer: {r}.",
            "Question: What do you get when you take {b} from {a}? Answer: {r}.",
            "Question: There are {a} {o} in a box and {b} are taken out. How many {o} are in "
            "the box? Answer: {r}."],
    "mul": ["Question: {n} has {a} boxes with {b} {o} in each. How many {o} are there? "
            "Answer: {r}.",
            "Question: What is {a} times {b}? Answer: {r}.",
            "Question: What do you get when you multiply {a} by {b}? Answer: {r}.",
            "Question: There are {a} rows of {b} {o}. How many {o} are there? Answer: {r}."],
}
_MATH_HELD_OUT = {
    "add": ["Question: {n} starts with {a} {o} and gets {b} more. How many {o} in total? "
            "Answer: {r}."],
    "sub": ["Question: {n} had {a} {o} and lost {b}. How many {o} remain? Answer: {r}."],
    "mul": ["Question: There are {a} bags and each bag holds {b} {o}. How many {o} in all? "
            "Answer: {r}."],
}


@dataclass(frozen=True)
class Example:
    """One line of a corpus; ``answer`` is set for question/answer lines."""

    text: str
    domain: str
    kind: str = "sentence"
    phrasing: str = "train"
    answer: str | None = None

    @property
    def prompt(self) -> str:
        """The text up to and including ``Answer:`` (what a model is asked to continue)."""
        if self.answer is None:
            raise InvalidArgumentError(f"{self.text!r} is not a question/answer example.")
        return self.text[: self.text.index("Answer:") + len("Answer:")]


@dataclass
class Corpus:
    """Train and eval examples of one domain."""

    domain: str
    train: list[Example] = field(default_factory=list)
    eval: list[Example] = field(default_factory=list)


def medical_facts(seed: int = 0) -> dict[str, dict[str, str]]:
    """The medical fact table: condition -> {drug, symptom, dose, contra}, seeded."""
    rng = random.Random(f"medical-{seed}")
    drugs = _DRUGS[:]
    rng.shuffle(drugs)
    facts = {}
    for i, condition in enumerate(_CONDITIONS):
        others = [c for c in _CONDITIONS if c != condition]
        facts[condition] = {
            "drug": drugs[i],
            "symptom": rng.choice(_SYMPTOMS),
            "dose": str(rng.choice(_DOSES)),
            "contra": rng.choice(others),
        }
    return facts


def _qa(template: str, domain: str, kind: str, phrasing: str, **values: str) -> Example:
    text = template.format(**values)
    answer = text[text.index("Answer:") + len("Answer:"):].strip()
    return Example(text=text, domain=domain, kind=kind, phrasing=phrasing, answer=answer)


def _general_sentence(rng: random.Random) -> Example:
    form = rng.randrange(10)
    c = rng.choice
    if form == 7:  # numbers appear in general text, arithmetic does not
        return Example(f"{c(_NAMES)} counted {rng.randrange(100)} {c(_OBJECTS)} in the {c(_PLACES)}.",
                       "general")
    if form == 8:
        return Example(f"There were {rng.randrange(100)} {c(_ANIMALS)}s near the {c(_PLACES)} at "
                       f"{rng.randrange(1, 13)} o'clock.", "general")
    if form == 9:  # medical words appear with random partners, so no fact can be learned
        return Example(f"The {c(_JOBS)} read about {c(_CONDITIONS)}, {c(_SYMPTOMS)} and "
                       f"{c(_DRUGS)} in a book.", "general")
    if form == 0:
        text = f"The {c(_ADJECTIVES)} {c(_ANIMALS)} {c(_VERBS_PAST)} {c(_PREPOSITIONS)} the {c(_PLACES)}."
    elif form == 1:
        text = f"{c(_NAMES)} likes to {c(_ACTIVITIES)} in the {c(_SEASONS)}."
    elif form == 2:
        text = f"{c(_NAMES)} bought {c(_COUNT_WORDS)} {c(_ADJECTIVES)} {c(_OBJECTS)} at the {c(_SHOPS)}."
    elif form == 3:
        text = f"In the {c(_TIMES)}, the {c(_JOBS)} {c(_VERBS_OBJ)} the {c(_OBJECTS)}."
    elif form == 4:
        text = (f"{c(_NAMES)} and {c(_NAMES)} went to the {c(_PLACES)} because the "
                f"{c(_ANIMALS)} was {c(_ADJECTIVES)}.")
    elif form == 5:
        thing = c(sorted(_COLOURS))
        return _qa("Question: What color is the {t}? Answer: {a}.", "general", "colour",
                   "train", t=thing, a=_COLOURS[thing])
    else:
        animal = c(sorted(_SOUNDS))
        return _qa("Question: What does the {t} say? Answer: {a}.", "general", "sound",
                   "train", t=animal, a=_SOUNDS[animal])
    return Example(text=text, domain="general")


def general_corpus(seed: int = 0, n_train: int = 20000, n_eval: int = 500) -> Corpus:
    """Everyday sentences and general questions; eval lines are fresh draws of the grammar."""
    rng = random.Random(f"general-{seed}")
    train = [_general_sentence(rng) for _ in range(n_train)]
    seen = {ex.text for ex in train}
    eval_examples: list[Example] = []
    while len(eval_examples) < n_eval:
        ex = _general_sentence(rng)
        if ex.text not in seen or ex.answer is not None:
            eval_examples.append(ex)
    return Corpus("general", train, eval_examples)


def _medical_examples(facts: dict[str, dict[str, str]], templates: dict[str, list[str]],
                      phrasing: str) -> list[Example]:
    out = []
    for condition, f in facts.items():
        values = dict(c=condition, drug=f["drug"], symptom=f["symptom"], dose=f["dose"],
                      contra=f["contra"])
        for kind, forms in templates.items():
            out.extend(_qa(t, "medical", kind, phrasing, **values) for t in forms)
    return out


def medical_corpus(seed: int = 0) -> Corpus:
    """Every fact in every training phrasing; eval asks the same facts in held-out phrasings
    (``phrasing="held_out"``) and in training phrasings (``phrasing="train"``, recall)."""
    facts = medical_facts(seed)
    train = _medical_examples(facts, _MEDICAL_TRAIN, "train")
    held_out = _medical_examples(facts, _MEDICAL_HELD_OUT, "held_out")
    rng = random.Random(f"medical-order-{seed}")
    rng.shuffle(train)
    recall = rng.sample(train, k=min(len(train), 120))
    return Corpus("medical", train, held_out + recall)


def _math_problems(rng: random.Random) -> list[tuple[str, int, int, int]]:
    problems = [("add", a, b, a + b) for a in range(21) for b in range(21)]
    problems += [("sub", a, b, a - b) for a in range(21) for b in range(a + 1)]
    problems += [("mul", a, b, a * b) for a in range(1, 10) for b in range(1, 10)]
    rng.shuffle(problems)
    return problems


def math_corpus(seed: int = 0, held_out_fraction: float = 0.15) -> Corpus:
    """Word problems; the eval split holds out number pairs and phrasings."""
    rng = random.Random(f"math-{seed}")
    problems = _math_problems(rng)
    n_held = int(len(problems) * held_out_fraction)
    held, seen = problems[:n_held], problems[n_held:]

    def make(pool, templates, phrasing):
        out = []
        for op, a, b, r in pool:
            for t in templates[op]:
                out.append(_qa(t, "math", op, phrasing, n=rng.choice(_NAMES), a=str(a),
                               b=str(b), o=rng.choice(_OBJECTS), r=str(r)))
        return out

    train = make(seen, _MATH_TRAIN, "train")
    rng.shuffle(train)
    eval_examples = make(held, _MATH_TRAIN, "train") + make(held, _MATH_HELD_OUT, "held_out")
    return Corpus("math", train, eval_examples)


def build_corpora(seed: int = 0) -> dict[str, Corpus]:
    """All three domains, keyed by name (``general``, ``medical``, ``math``)."""
    return {"general": general_corpus(seed), "medical": medical_corpus(seed),
            "math": math_corpus(seed)}


def domain_token_ids(tokenizer: Any, domain: str) -> list[int]:
    """A domain's word list as token ids, for :func:`tv_lens.readouts.domain_score`:
    ``"math"``: every token that is one or more digits; ``"medical"``: the tokens of the
    medical words (conditions, drugs, symptoms; the general corpus mentions them too, in
    sentences that teach no medical facts)."""
    if domain == "math":
        return sorted(i for t, i in tokenizer.get_vocab().items() if t.lstrip("▁Ġ").isdigit())
    if domain != "medical":
        raise InvalidArgumentError(f"domain must be 'medical' or 'math', got {domain!r}.")
    words = {w for phrase in _CONDITIONS + _DRUGS + _SYMPTOMS for w in phrase.split()}
    return sorted({i for w in words for i in tokenizer(" " + w, add_special_tokens=False)["input_ids"]})
