#!/usr/bin/env python
"""Generates the two sentence-level tasks of the encoder parity study (bench/parity_encoder.py) from templates,
deterministically, into bench/data/encoder_tasks/<task>_{train,heldout}.jsonl, one {"text", ["text_pair"], "label"}
object per line:

  intent      16-class intent classification of an assistant request. The held-out split uses templates never
              seen in training, and the two last values of every slot only there (training never sees them);
              several intents are near neighbours (alarm / timer / reminder, music / podcast, weather /
              air quality, flight / train), which keeps the task off the 100% ceiling.
  paraphrase  sentence-pair paraphrase detection (label 1: same meaning, 0: not). A pair states one event
              (who did what to whom, when) in two templates; a negative changes exactly one thing: swaps the
              two people, changes the object, the day, or negates the verb. Held-out pairs use unseen names,
              objects and template pairs.

    python bench/data/make_encoder_tasks.py       # rewrites the shipped files (same bytes every time)
"""
from __future__ import annotations

import json
import pathlib
import random

OUT = pathlib.Path(__file__).resolve().parent / "encoder_tasks"

# ---- intent ------------------------------------------------------------------------------------------------
# slot values: the last two of each list appear in held-out sentences only
SLOTS = {
    "time": ["6 am", "seven thirty", "noon", "5:45", "ten past eight", "midnight", "half past six", "9 pm",
             "quarter to seven", "4:15"],
    "dur": ["ten minutes", "half an hour", "90 seconds", "two hours", "25 minutes", "an hour", "three minutes",
            "45 minutes", "twelve minutes", "forty seconds"],
    "city": ["Paris", "Tokyo", "Denver", "Cairo", "Oslo", "Lima", "Mumbai", "Toronto", "Nairobi", "Lisbon"],
    "day": ["tomorrow", "on Friday", "this weekend", "tonight", "on Monday", "next week", "today",
            "on Sunday", "on Thursday", "the day after tomorrow"],
    "artist": ["Adele", "the Beatles", "Miles Davis", "Taylor Swift", "Bach", "Daft Punk", "Nina Simone",
               "Coldplay", "Bob Marley", "Radiohead"],
    "show": ["the science hour", "true crime weekly", "the history pod", "tech talk daily", "the morning brief",
             "cooking with Sam", "sports roundup", "the comedy corner", "mind and body", "market watch"],
    "task": ["call mom", "buy milk", "pay the rent", "water the plants", "send the report", "book a dentist",
             "pick up the kids", "renew my passport", "feed the cat", "return the library books"],
    "dish": ["sushi", "pizza", "tacos", "ramen", "curry", "pasta", "burgers", "dumplings", "falafel", "pho"],
    "n": ["two", "four", "six", "three", "eight", "five", "seven", "ten", "a dozen", "nine"],
    "room": ["kitchen", "bedroom", "living room", "hallway", "office", "garage", "bathroom", "porch",
             "basement", "attic"],
    "lang": ["French", "Spanish", "German", "Japanese", "Italian", "Korean", "Arabic", "Portuguese", "Hindi",
             "Dutch"],
    "phrase": ["good morning", "where is the station", "thank you very much", "how much is this",
               "I am lost", "see you later", "the bill please", "nice to meet you", "I need a doctor",
               "happy birthday"],
    "topic": ["politics", "football", "the stock market", "science", "technology", "the election",
              "the weather", "health", "movies", "space"],
    "expr": ["15 times 23", "the square root of 144", "twenty percent of 80", "300 divided by 7",
             "12 plus 98", "7 squared", "half of 350", "1000 minus 367", "18 percent of 250", "9 cubed"],
    "song": ["Yesterday", "Imagine", "Hallelujah", "Bohemian Rhapsody", "Hey Jude", "Wonderwall", "Respect",
             "Purple Rain", "Let It Be", "Hotel California"],
    "item": ["eggs", "bread", "coffee", "apples", "rice", "butter", "olive oil", "toothpaste", "batteries",
             "tea"],
}

# per intent: templates; the last 3 of each list are held out
INTENTS = {
    "set_alarm": ["wake me up at {time}", "set an alarm for {time}", "alarm at {time} {day} please",
                  "I need to get up at {time}", "can you set my alarm to {time}", "make sure I wake at {time} {day}",
                  "please ring me awake at {time}", "get me out of bed at {time}", "put an alarm on for {time} {day}"],
    "set_timer": ["set a timer for {dur}", "start a {dur} timer", "count down {dur}", "timer {dur} please",
                  "let me know when {dur} have passed", "time {dur} for the oven", "begin a countdown of {dur}",
                  "give me a {dur} countdown", "tell me when {dur} are up"],
    "reminder": ["remind me to {task} {day}", "don't let me forget to {task}", "I have to {task} {day}, remind me",
                 "add a reminder to {task}", "set a reminder {day} to {task}", "nudge me to {task} at {time}",
                 "make a note to remind me to {task}", "ping me {day} so I {task}", "I must not forget to {task} {day}"],
    "weather": ["what's the weather in {city} {day}", "will it rain in {city} {day}", "how hot is it in {city}",
                "do I need an umbrella {day}", "forecast for {city} {day}", "is it going to snow in {city}",
                "how cold will it be {day} in {city}", "what temperature is it in {city} right now",
                "will it be sunny in {city} {day}"],
    "air_quality": ["how is the air quality in {city}", "is the air safe to breathe in {city} {day}",
                    "pollution level in {city}", "what is the smog like in {city} {day}",
                    "pollen count in {city} {day}", "is it safe to jog outside in {city} given the pollution",
                    "how clean is the air in {city} today", "any air pollution warning for {city}",
                    "check the particulate levels in {city}"],
    "play_music": ["play some {artist}", "put on {song} by {artist}", "I want to hear {artist}",
                   "start playing {song}", "play the latest album by {artist}", "shuffle songs by {artist}",
                   "can you play {song}", "let's listen to {artist}", "queue up {song} please"],
    "play_podcast": ["play the latest episode of {show}", "resume {show}", "put on the podcast {show}",
                     "next episode of {show} please", "I want to listen to {show}", "play {show} from the start",
                     "continue the podcast I was listening to", "start {show}", "catch me up on {show}"],
    "order_food": ["order {dish} for dinner", "get me some {dish} delivered", "I'd like {n} portions of {dish}",
                   "find a place that delivers {dish}", "order {dish} to my place {day}", "I'm hungry, get {dish}",
                   "can you have {dish} sent over", "buy me {dish} for lunch", "food delivery, {dish} please"],
    "book_table": ["book a table for {n} {day}", "reserve a table at the {dish} place for {n}",
                   "get us a table for {n} at {time}", "I need a dinner reservation for {n} {day}",
                   "make a reservation for {n} people at {time}", "find a table for {n} at a {dish} restaurant",
                   "can we eat out {day}, table for {n}", "save us seats for {n} at {time}",
                   "reserve dinner for {n} {day} at {time}"],
    "flight": ["book a flight to {city} {day}", "find flights to {city}", "when is the next plane to {city}",
               "I need to fly to {city} {day}", "cheapest airfare to {city}", "get me a plane ticket to {city}",
               "which airlines fly to {city} {day}", "check in for my flight to {city}",
               "how long is the flight to {city}"],
    "train": ["book a train to {city} {day}", "when is the next train to {city}", "rail tickets to {city}",
              "I need to take the train to {city} {day}", "train times to {city}", "which platform for {city}",
              "get me a seat on the train to {city}", "how long does the train take to {city}",
              "is the {time} train to {city} on time"],
    "lights": ["turn on the lights in the {room}", "switch off the {room} lights", "dim the {room}",
               "make the {room} brighter", "lights off in the {room} at {time}", "turn the {room} lamp on",
               "it's too dark in the {room}", "kill the lights in the {room}", "set the {room} lights to half"],
    "translate": ["how do you say {phrase} in {lang}", "translate {phrase} into {lang}", "what is {phrase} in {lang}",
                  "say {phrase} in {lang}", "{lang} for {phrase} please", "I need {phrase} translated to {lang}",
                  "how would a {lang} speaker say {phrase}", "put {phrase} into {lang}",
                  "what's the {lang} word for {phrase}"],
    "news": ["what's the news about {topic}", "latest headlines on {topic}", "any news on {topic} {day}",
             "give me the {topic} news", "what happened in {topic} {day}", "read me the headlines about {topic}",
             "brief me on {topic}", "top stories about {topic}", "what are people saying about {topic}"],
    "calculator": ["what is {expr}", "calculate {expr}", "how much is {expr}", "work out {expr} for me",
                   "compute {expr}", "quick math: {expr}", "can you figure out {expr}", "solve {expr}",
                   "tell me {expr}"],
    "shopping_list": ["add {item} to my shopping list", "put {item} on the list", "we're out of {item}",
                      "I need to buy {item}", "remove {item} from the shopping list", "shopping list: {n} {item}",
                      "don't forget {item} next time we shop", "we need {item}", "note that we should get {item}"],
}


def _fill(template: str, rng: random.Random, held: bool) -> str:
    out = template
    for slot, values in SLOTS.items():
        while "{" + slot + "}" in out:
            pool = values if held else values[:-2]
            out = out.replace("{" + slot + "}", rng.choice(pool), 1)
    return " ".join(out.split())


def intent_task(rng: random.Random, n_train: int = 48, n_held: int = 20):
    labels = sorted(INTENTS)
    train, held = [], []
    for li, name in enumerate(labels):
        tpls = INTENTS[name]
        for split, pool, n, is_held in ((train, tpls[:-3], n_train, False), (held, tpls[-3:], n_held, True)):
            seen = set()
            tries = 0
            while sum(1 for e in split if e["label"] == li) < n and tries < 50 * n:
                tries += 1
                text = _fill(rng.choice(pool), rng, is_held)
                if text not in seen:
                    seen.add(text)
                    split.append({"text": text, "label": li})
    return labels, train, held


# ---- paraphrase --------------------------------------------------------------------------------------------
PEOPLE = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Karen", "Leo",
          "Maria", "Nina", "Oscar", "Paul"]          # last 4 held out
THINGS = ["a letter", "the keys", "a book", "the money", "a gift", "the report", "a bicycle", "the tickets",
          "a laptop", "the photos", "a guitar", "the map"]  # last 3 held out
DAYS = ["on Monday", "on Tuesday", "on Wednesday", "on Thursday", "on Friday", "on Saturday", "yesterday",
        "last week"]                                # last 2 held out
# each verb: (active template, passive / reworded templates...) with {a} giver, {b} receiver, {x} thing, {d} day
VERBS = [
    ("{a} gave {x} to {b} {d}", "{a} handed {b} {x} {d}", "{d}, {b} received {x} from {a}",
     "{x} was given to {b} by {a} {d}"),
    ("{a} sold {x} to {b} {d}", "{b} bought {x} from {a} {d}", "{d}, {a} sold {b} {x}",
     "{x} was sold by {a} to {b} {d}"),
    ("{a} lent {x} to {b} {d}", "{b} borrowed {x} from {a} {d}", "{d} {a} loaned {b} {x}",
     "{x} was lent to {b} by {a} {d}"),
    ("{a} sent {x} to {b} {d}", "{b} got {x} that {a} sent {d}", "{d}, {a} mailed {x} to {b}",
     "{x} was sent by {a} to {b} {d}"),
    ("{a} showed {x} to {b} {d}", "{b} was shown {x} by {a} {d}", "{d} {a} let {b} see {x}",
     "{a} presented {x} to {b} {d}"),
]
NEGATED = {"gave": "did not give", "sold": "did not sell", "lent": "did not lend", "sent": "did not send",
           "showed": "did not show"}


def _render(t: str, a, b, x, d) -> str:
    s = t.format(a=a, b=b, x=x, d=d)
    return s[0].upper() + s[1:] + "."


def paraphrase_task(rng: random.Random, n_train: int = 640, n_held: int = 320):
    def make(n, held):
        people = PEOPLE[-4:] + PEOPLE[:4] if held else PEOPLE[:-4]
        things = THINGS[-3:] if held else THINGS[:-3]
        days = DAYS[-2:] + DAYS[:2] if held else DAYS[:-2]
        out, seen = [], set()
        while len(out) < n:
            v = rng.choice(VERBS)
            # train pairs: templates (0,1), (0,2), (1,2); held-out pairs: anything with template 3
            pairs = [(0, 3), (1, 3), (2, 3)] if held else [(0, 1), (0, 2), (1, 2)]
            i, j = rng.choice(pairs)
            if rng.random() < 0.5:
                i, j = j, i
            a, b = rng.sample(people, 2)
            x, d = rng.choice(things), rng.choice(days)
            s1 = _render(v[i], a, b, x, d)
            label = int(len(out) % 2 == 0)   # balanced
            if label:
                s2 = _render(v[j], a, b, x, d)
            else:
                kind = rng.choice(["swap", "thing", "day", "negate"])
                if kind == "swap":
                    s2 = _render(v[j], b, a, x, d)
                elif kind == "thing":
                    s2 = _render(v[j], a, b, rng.choice([t for t in things if t != x]), d)
                elif kind == "day":
                    s2 = _render(v[j], a, b, x, rng.choice([t for t in days if t != d]))
                else:
                    verb = v[0].split()[1]
                    s2 = _render(v[0].replace(verb, NEGATED[verb]), a, b, x, d)
                    if rng.random() < 0.5:
                        s1, s2 = s2, s1
            if (s1, s2) in seen:
                continue
            seen.add((s1, s2))
            out.append({"text": s1, "text_pair": s2, "label": label})
        return out
    return ["different", "paraphrase"], make(n_train, False), make(n_held, True)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, fn, seed in (("intent", intent_task, 1234), ("paraphrase", paraphrase_task, 5678)):
        labels, train, held = fn(random.Random(seed))
        random.Random(seed + 1).shuffle(train)
        for split, rows in (("train", train), ("heldout", held)):
            with open(OUT / f"{name}_{split}.jsonl", "w") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        (OUT / f"{name}_labels.json").write_text(json.dumps(labels) + "\n")
        print(f"{name}: {len(labels)} classes, {len(train)} train, {len(held)} held-out")


if __name__ == "__main__":
    main()
