"""The built-in task suite: deterministic text classification from templates.

Why generated rather than downloaded: tests and benchmarks need data that is
offline, instant and identical on every machine, arranged in *families* of
related tasks so that transfer between trained modules can be measured.
Tasks in a family share templates and part of their vocabulary; each has its
own domain words, so siblings are related but not interchangeable.

Labels are never noisy: every template decides its label by construction.
Difficulty comes from negation ("not bad"), contrast clauses ("..., but"),
neutral asides and near-miss sentence pairs.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace

from pelthub.tasks.io import Example

# A maker draws one (text, text_pair) whose label is the given id.
Maker = Callable[[random.Random, int], tuple[str, str | None]]


def _ws(words: str) -> tuple[str, ...]:
    """Split a '|'-separated list; entries may be phrases with spaces."""
    return tuple(w.strip() for w in words.split("|"))


def _tidy(text: str) -> str:
    """Collapse spaces left by empty slots and capitalise the first letter."""
    text = " ".join(text.split()).replace(" .", ".").replace(" ,", ",").replace(" ?", "?")
    return text[:1].upper() + text[1:]


# ---------------------------------------------------------------- sentiment
_POS = _ws("good|great|excellent|wonderful|lovely|fantastic")
_NEG = _ws("bad|awful|terrible|poor|disappointing|horrible")
_NEGATABLE_POS = _ws("good|great|worth it|pleasant")  # "not good" reads as negative
_NEGATABLE_NEG = _ws("bad|disappointing|a letdown")  # "not bad" reads as positive
_INTENSIFIERS = ("", "", "really ", "very ", "quite ", "truly ")


@dataclass(frozen=True)
class _Domain:
    """What one sentiment task talks about; the first two adjectives of each
    polarity must read naturally after "not"."""

    items: tuple[str, ...]
    pos: tuple[str, ...]
    neg: tuple[str, ...]
    templates: tuple[str, ...]  # slots: {item}, {judg}
    asides: tuple[str, ...]  # neutral sentences that carry no sentiment


def _judgement(rng: random.Random, d: _Domain, label: int) -> str:
    if rng.random() < 0.25:  # negate the opposite polarity
        return "not " + rng.choice(_NEGATABLE_NEG + d.neg[:2] if label else _NEGATABLE_POS + d.pos[:2])
    return rng.choice(_INTENSIFIERS) + rng.choice(d.pos + _POS if label else d.neg + _NEG)


def _sentiment(d: _Domain) -> Maker:
    def make(rng: random.Random, label: int) -> tuple[str, None]:
        item, other = rng.sample(d.items, 2)
        text = rng.choice(d.templates).format(item=item, judg=_judgement(rng, d, label))
        roll = rng.random()
        if roll < 0.2:  # the overall verdict follows "but"
            text = f"the {other} was {rng.choice(d.neg if label else d.pos)}, but {text}"
        elif roll < 0.5:
            aside = rng.choice(d.asides)
            text = f"{aside} {_tidy(text)}" if rng.random() < 0.5 else f"{text} {aside}"
        return text, None

    return make


_MOVIES = _Domain(
    items=_ws("film|movie|plot|script|ending|soundtrack|acting|cast|sequel|dialogue|pacing|final scene"),
    pos=_ws("funny|gripping|hilarious|brilliant|captivating|clever"),
    neg=_ws("boring|predictable|dull|clumsy|tedious|forgettable"),
    templates=_ws("the {item} was {judg}.|I thought the {item} was {judg}.|honestly, the {item} felt {judg}."
                  "|in my opinion the {item} is {judg}.|my friends said the {item} was {judg}."),
    asides=_ws("We saw it on a Friday night.|It runs just over two hours.|My sister picked it."
               "|The theater was half empty.|I watched it at home.|It came out last spring."),
)
_PRODUCTS = _Domain(
    items=_ws("blender|charger|phone case|kettle|backpack|vacuum|pair of headphones|desk lamp|toaster"
              "|keyboard|power bank|desk chair"),
    pos=_ws("sturdy|reliable|handy|well made|solid|durable"),
    neg=_ws("flimsy|faulty|defective|useless|fragile|noisy"),
    templates=_ws("the {item} I ordered is {judg}.|this {item} turned out {judg}.|my new {item} seems {judg}."
                  "|after a week, the {item} is {judg}.|the {item} arrived and it is {judg}."),
    asides=_ws("It was delivered on Monday.|I bought it for my office.|The box was blue."
               "|It came in two colours.|I ordered it online.|My brother has the same one."),
)
_RESTAURANTS = _Domain(
    items=_ws("pasta|soup|steak|dessert|curry|pizza|salad|coffee|bread|fish|lunch special|dinner"),
    pos=_ws("fresh|tasty|delicious|flavorful|perfectly cooked|satisfying"),
    neg=_ws("bland|greasy|stale|cold|overcooked|too salty"),
    templates=_ws("the {item} here was {judg}.|we ordered the {item} and it was {judg}."
                  "|the {item} at this place is {judg}.|I found the {item} {judg}.|tonight the {item} was {judg}."),
    asides=_ws("We had a table by the window.|It was my friend's birthday.|We arrived around seven."
               "|Parking was on the street.|We came for lunch on Sunday.|The place was busy."),
)
_HOTELS = _Domain(
    items=_ws("room|bed|bathroom|lobby|breakfast|pool|view|shower|balcony|reception|gym|hallway"),
    pos=_ws("clean|quiet|spacious|comfortable|spotless|cozy"),
    neg=_ws("noisy|dirty|cramped|shabby|smelly|uncomfortable"),
    templates=_ws("the {item} was {judg}.|our {item} was {judg} during the stay.|we found the {item} {judg}."
                  "|the {item} at the hotel is {judg}.|on arrival the {item} looked {judg}."),
    asides=_ws("We stayed three nights.|We checked in late on Thursday.|The hotel is near the station."
               "|It was a business trip.|We booked it last month.|Our flight landed at noon."),
)


# -------------------------------------------------------------------- topic
def _topic(subjects: dict[str, str] | str, events: dict[str, str], whens: str, templates: str) -> Maker:
    """Topic tasks: the label is carried by the event (and by the subject,
    unless one subject list is shared by every label)."""
    labels = list(events)
    subj = {t: _ws(subjects if isinstance(subjects, str) else subjects[t]) for t in labels}
    ev = {t: _ws(events[t]) for t in labels}
    when_list, template_list = _ws(whens), _ws(templates)

    def make(rng: random.Random, label: int) -> tuple[str, None]:
        topic = labels[label]
        text = rng.choice(template_list).format(
            subj=rng.choice(subj[topic]), event=rng.choice(ev[topic]), when=rng.choice(when_list))
        return text, None

    return make


_NEWS = _topic(
    subjects={
        "sports": "the home team|the coach|the striker|the goalkeeper|the champions|the captain|the young sprinter",
        "business": "the bank|the retailer|shareholders|the startup|the airline|investors|the chief executive",
        "science": "researchers|astronomers|the lab|biologists|a team of physicists|the space agency|chemists",
        "politics": "the senator|the prime minister|parliament|the opposition|voters|the governor|the minister",
    },
    events={
        "sports": "won the final|lost the derby|signed a new contract with the club|broke the marathon record"
                  "|was injured before the match|reached the semifinals|scored twice in the second half",
        "business": "reported higher quarterly profits|cut hundreds of jobs|agreed to a merger|raised prices again"
                    "|saw its shares fall|opened new stores abroad|announced a takeover bid",
        "science": "discovered a new species|measured a distant galaxy|published a study on cells"
                   "|launched a telescope|found traces of water on the moon|sequenced a plant genome",
        "politics": "passed a new law|called an early election|vetoed the budget bill|won the vote"
                    "|resigned after the scandal|met foreign leaders|proposed tax reforms",
    },
    whens="on Monday|this week|late on Friday|after months of talks|according to reports|in a surprise move"
          "|yesterday|for the first time",
    templates="{subj} {event} {when}.|{when}, {subj} {event}.|report: {subj} {event}|breaking: {subj} {event} {when}"
              "|sources say {subj} {event}.",
)
_FORUM = _topic(
    subjects={
        "sports": "my kid's team|our coach|the local club|my running group|the team I support|my tennis partner",
        "technology": "my laptop|the new phone update|my router|this app|my graphics card|the printer driver",
        "health": "my doctor|my back|the new diet|my physio|my sleep|my knee",
        "money": "my bank|the mortgage rate|my savings account|my landlord|the tax office|my pension fund",
    },
    events={
        "sports": "won the final|lost every match this season|needs a new goalkeeper|trains three times a week"
                  "|made the playoffs|signed a new striker",
        "technology": "keeps crashing|won't connect to wifi|installed a buggy update|drains the battery fast"
                      "|lost all my files|needs more memory",
        "health": "says I need more rest|hurts after running|made me lose weight|recommends daily stretching"
                  "|got worse with the flu|needs an x-ray",
        "money": "raised the fees again|cut the interest rate|sent me a huge bill|wants a bigger deposit"
                 "|refunded the payment|lost value this year",
    },
    whens="again|since last week|this morning|for the third time|after the weekend|today",
    templates="anyone else think {subj} {event}?|quick question: {subj} {event}, what should I do?"
              "|update: {subj} {event} {when}.|so {subj} {event} {when}... thoughts?"
              "|not sure where to post this, but {subj} {event}.",
)
_HOBBIES = _topic(
    subjects="I|my partner|grandma|my roommate|we|my dad|my neighbour|our club",
    events={
        "cooking": "baked sourdough bread|burned the garlic sauce|tried a new curry recipe|made fresh pasta"
                   "|roasted vegetables in the oven|cooked soup for the neighbours|whisked eggs for an omelette",
        "gardening": "planted tomatoes|pruned the roses|watered the seedlings|dug a new flower bed"
                     "|harvested courgettes|repotted the herbs|pulled weeds by the fence",
        "music": "practised guitar scales|tuned the old piano|wrote a new song|joined a choir"
                 "|learned a drum pattern|recorded a violin piece|played chords on the ukulele",
    },
    whens="on Saturday|last night|this morning|after work|before dinner|on a rainy afternoon",
    templates="this weekend {subj} {event}.|{subj} {event} {when}.|hobby log: {subj} {event}."
              "|{when}, {subj} {event} and loved it.|guess what, {subj} {event} {when}!",
)


# --------------------------------------------------------------------- form
_PEOPLE = _ws("the manager|my neighbour|the new intern|our teacher|the driver|Sarah|the committee"
              "|your brother|the landlord|Tom")
_TIMES = _ws("this morning|before lunch|on Friday|after the meeting|this week|")
# base, past, past participle, -ing form, objects
_ACTIONS = tuple((*a.split(","), _ws(objs)) for a, objs in (
    ("send,sent,sent,sending", "the report|the invoice|the slides"),
    ("fix,fixed,fixed,fixing", "the printer|the leak|the login page"),
    ("book,booked,booked,booking", "a meeting room|the flights|a table"),
    ("call,called,called,calling", "the supplier|the bank|the plumber"),
    ("clean,cleaned,cleaned,cleaning", "the kitchen|the storage room"),
    ("move,moved,moved,moving", "the meeting|the deadline"),
    ("order,ordered,ordered,ordering", "new chairs|more paper|lunch for the team"),
    ("check,checked,checked,checking", "the schedule|the figures|the contract"),
    ("sign,signed,signed,signing", "the contract|the form"),
    ("update,updated,updated,updating", "the website|the budget"),
))


def _form(templates: dict[str, str], drop_question_mark: float = 0.0) -> Maker:
    """Form tasks share people, actions and times; only the wrapper decides
    the label. Dropping some "?" stops punctuation alone from giving it away."""
    per_label = [_ws(t) for t in templates.values()]

    def make(rng: random.Random, label: int) -> tuple[str, None]:
        base, past, pp, ing, objs = rng.choice(_ACTIONS)
        text = rng.choice(per_label[label]).format(
            subj=rng.choice(_PEOPLE), base=base, past=past, pp=pp, ing=ing, obj=rng.choice(objs),
            time=rng.choice(_TIMES))
        if text.endswith("?") and rng.random() < drop_question_mark:
            text = text[:-1]
        return text, None

    return make


_STATEMENTS = ("{subj} {past} {obj} {time}.|I think {subj} will {base} {obj} {time}.|I know why {subj} {past} {obj}."
               "|{subj} asked me to {base} {obj}.|nobody knows when {subj} will {base} {obj}."
               "|{subj} has already {pp} {obj}.")
_QUESTIONS = ("did {subj} {base} {obj} {time}?|why did {subj} {base} {obj}?|when will {subj} {base} {obj}?"
              "|has {subj} {pp} {obj} yet?|is it true that {subj} {past} {obj}?"
              "|do you know if {subj} {past} {obj} {time}?")
_QUESTION_VS_STATEMENT = _form({"statement": _STATEMENTS, "question": _QUESTIONS}, drop_question_mark=0.3)
_FORMALITY = _form({
    "informal": "hey, {subj} {past} {obj} {time} lol|btw {subj} is gonna {base} {obj} {time}"
                "|ugh, {subj} still hasn't {pp} {obj}!!|so {subj} totally {past} {obj}, no joke"
                "|can u {base} {obj} {time}? thx|omg {subj} {past} {obj} again",
    "formal": "please be advised that {subj} {past} {obj} {time}.|I would be grateful if you could {base} {obj} {time}."
              "|kindly note that {subj} will {base} {obj}.|we regret to inform you that {subj} has not {pp} {obj}."
              "|could you kindly {base} {obj} at your earliest convenience?"
              "|I am writing to confirm that {subj} {past} {obj}.",
})
_SPEECH_ACT = _form({
    "statement": "{subj} {past} {obj} {time}.|{subj} will {base} {obj} {time}.|I heard that {subj} {past} {obj}."
                 "|{subj} has {pp} {obj}.|it seems {subj} forgot to {base} {obj}.",
    "question": "did {subj} {base} {obj} {time}?|who {past} {obj} {time}?|when will {subj} {base} {obj}?"
                "|has {subj} {pp} {obj}?|why hasn't {subj} {pp} {obj}?",
    "request": "please {base} {obj} {time}.|can you please {base} {obj}?|I need you to {base} {obj} {time}."
               "|would you mind {ing} {obj}?|remember to {base} {obj} {time}.|could you {base} {obj} for {subj}?",
}, drop_question_mark=0.2)

# The question task of `form_question` in chat: same label ids, other wrappers, so the pair
# is related with aligned labels (a source's head means the same thing on the other).
_QUESTION_IN_CHAT = _form({
    "statement": "fyi {subj} {past} {obj} {time}.|just so you know, {subj} will {base} {obj}."
                 "|heads up: {subj} has {pp} {obj}.|{subj} {past} {obj} {time}, all good."
                 "|looks like {subj} forgot to {base} {obj}.|ok so {subj} is {ing} {obj} {time}.",
    "question": "quick q: did {subj} {base} {obj} {time}?|any idea if {subj} {past} {obj}?"
                "|hey, has {subj} {pp} {obj} yet?|wait, is {subj} {ing} {obj} {time}?"
                "|so when will {subj} {base} {obj}?|do we know why {subj} {past} {obj}?",
}, drop_question_mark=0.4)

# --------------------------------------------------------------------- pair
_NAMES = _ws("Anna|Ben|Carla|David|Elena|Farid|Grace|Hugo|Ines|Jonas|Kemal|Lena|Marco|Nadia|Omar|Priya")
_PLACES = _ws("at the market|in the park|at home|at school|in the village|near the station|at the harbour"
              "|in the office")
_WHENS = _ws("on Monday|last weekend|in the morning|yesterday|after lunch|in June")
# base, past, participle, synonym past, synonym participle, objects
_Deed = tuple[str, str, str, str, str, tuple[str, ...]]
_DEEDS: tuple[_Deed, ...] = tuple((*a.split(","), _ws(objs)) for a, objs in (
    ("fix,fixed,fixed,repaired,repaired", "the bicycle|the old radio|the garden gate"),
    ("buy,bought,bought,purchased,purchased", "a new lamp|the concert tickets|a used car"),
    ("clean,cleaned,cleaned,tidied,tidied", "the garage|the attic|the classroom"),
    ("send,sent,sent,mailed,mailed", "the package|a postcard|the letter"),
    ("cook,cooked,cooked,prepared,prepared", "the dinner|a fish stew|the rice"),
    ("find,found,found,discovered,discovered", "the lost keys|an old map|the missing wallet"),
    ("build,built,built,constructed,constructed", "a shed|the bookshelf|a wooden bench"),
    ("carry,carried,carried,moved,moved", "the boxes|the heavy table|the suitcase"),
    ("paint,painted,painted,painted,painted", "the fence|the kitchen wall|the boat"),
    ("sell,sold,sold,sold,sold", "the piano|an old bicycle|the sofa"),
))


@dataclass(frozen=True)
class _Fact:
    name: str
    deed: _Deed
    obj: str
    place: str
    when: str

    @staticmethod
    def draw(rng: random.Random) -> _Fact:
        deed = rng.choice(_DEEDS)
        return _Fact(rng.choice(_NAMES), deed, rng.choice(deed[5]), rng.choice(_PLACES), rng.choice(_WHENS))

    def render(self, form: int) -> str:
        """Four wordings of the same fact: active, fronted synonym, passive, passive synonym."""
        _, past, pp, syn_past, syn_pp, _ = self.deed
        return (f"{self.name} {past} {self.obj} {self.place} {self.when}.",
                f"{self.when}, {self.name} {syn_past} {self.obj} {self.place}.",
                f"{self.obj} was {pp} by {self.name} {self.place} {self.when}.",
                f"{self.obj} was {syn_pp} {self.place} {self.when} by {self.name}.")[form]


def _near_miss(rng: random.Random, fact: _Fact) -> _Fact:
    """The same fact with one slot changed: the hard negatives of paraphrase."""
    slot = rng.choice(("name", "obj", "place", "when"))
    pool = {"name": _NAMES, "obj": fact.deed[5], "place": _PLACES, "when": _WHENS}[slot]
    return replace(fact, **{slot: rng.choice([v for v in pool if v != getattr(fact, slot)])})


def _paraphrase(rng: random.Random, label: int) -> tuple[str, str]:
    fact = _Fact.draw(rng)
    first, second = rng.sample(range(4), 2)
    if label == 1:
        other = fact
    else:  # half near misses, half unrelated facts
        other = _near_miss(rng, fact) if rng.random() < 0.5 else _Fact.draw(rng)
    return fact.render(first), other.render(second)


_HYPOTHESES = tuple(_ws(h) for h in (
    # entailment
    ("{name} {past} {obj}.|someone {past} {obj} {place}.|{obj} was {pp} {when}.|{name} {syn_past} something."
     "|{name} was {place} {when}."),
    # neutral
    ("{name} {past} {obj} for {other}.|{other} also {past} {obj}.|{name} {past} {obj} because it was urgent."
     "|{name} {past} {other_obj} too.|{name} was tired afterwards."),
    # contradiction
    ("{name} did not {base} {obj}.|nobody {past} {obj}.|{obj} was never {pp}.|{name} {past} nothing {place}."
     "|{name} was not {place} {when}."),
))


def _entailment(rng: random.Random, label: int) -> tuple[str, str]:
    fact = _Fact.draw(rng)
    base, past, pp, syn_past, _, objs = fact.deed
    premise = fact.render(rng.choice((0, 1)))
    hypothesis = rng.choice(_HYPOTHESES[label]).format(
        name=fact.name, base=base, past=past, pp=pp, syn_past=syn_past, obj=fact.obj, place=fact.place,
        when=fact.when, other=rng.choice([n for n in _NAMES if n != fact.name]),
        other_obj=rng.choice([o for o in objs if o != fact.obj]))
    return premise, hypothesis


_CHATTER = {topic: _ws(phrases) for topic, phrases in {
    "cooking": "baked bread for the neighbours|tried a new soup recipe|burned the rice again"
               "|made pancakes for breakfast|roasted a chicken with lemon|chopped onions for the stew",
    "travel": "missed the train to Madrid|booked a cheap flight to Oslo|lost a suitcase at the airport"
              "|hiked along the coast in Portugal|slept in a hostel in Prague|rented a car for a road trip",
    "weather": "got soaked in the sudden storm|watched the snow fall all night|complained about the heatwave"
               "|checked the forecast for hail|saw a rainbow after the rain|shovelled snow from the driveway",
    "pets": "took the dog to the vet|bought a scratching post for the cat|taught the puppy to sit"
            "|cleaned the hamster cage|walked the neighbour's dog|adopted a kitten from the shelter",
    "football": "scored a goal in the park match|watched the cup final with friends|bought new football boots"
                "|coached the junior team|argued about the referee's decision|practised penalty kicks",
    "work": "finished the quarterly report|had a long meeting with the boss|asked for a pay rise"
            "|fixed a bug before the deadline|answered emails all morning|trained a new colleague",
}.items()}
_CHATTER_FRAMES = _ws("{name} {phrase}.|yesterday {name} {phrase}.|{name} told me they {phrase}."
                      "|last week {name} {phrase}.|apparently {name} {phrase}.")


def _same_topic(rng: random.Random, label: int) -> tuple[str, str]:
    topic, other_topic = rng.sample(sorted(_CHATTER), 2)
    first = rng.choice(_CHATTER[topic])
    second_pool = [p for p in _CHATTER[topic] if p != first] if label else _CHATTER[other_topic]
    name, other_name = rng.sample(_NAMES, 2)
    return (rng.choice(_CHATTER_FRAMES).format(name=name, phrase=first),
            rng.choice(_CHATTER_FRAMES).format(name=other_name, phrase=rng.choice(second_pool)))


# ----------------------------------------------------------------- registry
@dataclass(frozen=True)
class Spec:
    """How to generate one task: its family, its labels in id order, and its maker."""

    family: str
    label_names: tuple[str, ...]
    make: Maker

    def draw(self, rng: random.Random, label: int) -> Example:
        """One tidied example of ``label``."""
        text, pair = self.make(rng, label)
        return Example(_tidy(text), label, _tidy(pair) if pair is not None else None)


_SENTIMENT = ("negative", "positive")
SPECS: dict[str, Spec] = {
    "sentiment_movies": Spec("sentiment", _SENTIMENT, _sentiment(_MOVIES)),
    "sentiment_products": Spec("sentiment", _SENTIMENT, _sentiment(_PRODUCTS)),
    "sentiment_restaurants": Spec("sentiment", _SENTIMENT, _sentiment(_RESTAURANTS)),
    "sentiment_hotels": Spec("sentiment", _SENTIMENT, _sentiment(_HOTELS)),
    "topic_news": Spec("topic", ("sports", "business", "science", "politics"), _NEWS),
    "topic_forum": Spec("topic", ("sports", "technology", "health", "money"), _FORUM),
    "topic_hobbies": Spec("topic", ("cooking", "gardening", "music"), _HOBBIES),
    "form_question": Spec("form", ("statement", "question"), _QUESTION_VS_STATEMENT),
    "form_question_chat": Spec("form", ("statement", "question"), _QUESTION_IN_CHAT),
    "form_formality": Spec("form", ("informal", "formal"), _FORMALITY),
    "form_speech_act": Spec("form", ("statement", "question", "request"), _SPEECH_ACT),
    "pair_paraphrase": Spec("pair", ("different", "paraphrase"), _paraphrase),
    "pair_same_topic": Spec("pair", ("different_topic", "same_topic"), _same_topic),
    "pair_entailment": Spec("pair", ("entailment", "neutral", "contradiction"), _entailment),
}

