"""Regenerate the shipped instruction dataset qlora_ext/dataset/{train,heldout}.jsonl (deterministic; run from the
repo root: `python tools/gen_dataset.py`). Every answer is short and exactly checkable, so exact match of a
greedy generation is a meaningful accuracy.

Twelve tasks (formatting, extraction, date and unit conversion, arithmetic, sorting, counting) with the
instruction in English, French, German or Spanish. Each record is Alpaca-style
{"instruction", "input", "output"} plus "task" and "lang" (ignored by the loaders, used for per-task reports).
The held-out split is generated first and no (instruction, input) pair of it appears in the train split.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import random

LANGS = ("en", "fr", "de", "es")

# Lower-case ASCII nouns per language (ASCII keeps alphabetical order unambiguous for sort_words).
WORDS = {
    "en": "apple river house garden window bread cloud mountain letter table candle forest market "
          "bottle island pencil summer winter orange silver tiger rabbit castle bridge".split(),
    "fr": "pomme maison jardin fenetre pain nuage montagne lettre table bougie foret marche bouteille "
          "crayon hiver orange argent tigre lapin chateau pont chemin soleil livre".split(),
    "de": "apfel fluss haus garten fenster brot wolke berg brief tisch kerze wald markt flasche insel "
          "bleistift sommer winter silber tiger hase burg zug buch".split(),
    "es": "manzana casa jardin ventana pan nube montana carta mesa vela bosque mercado botella isla "
          "lapiz verano invierno naranja plata tigre conejo castillo puente libro".split(),
}
# Adjectives with accents and umlauts, for the capital-letters task.
PHRASE_WORDS = {
    "en": "quiet green small happy early bright heavy open warm cold fresh simple".split(),
    "fr": "été café rouge élève fenêtre très joli forêt petit grand bleu château".split(),
    "de": "grün schön klein groß müde früh über straße käse blau warm leise".split(),
    "es": "niño azul pequeño año rápido árbol canción verde fácil mañana rojo claro".split(),
}
NAMES = ["Anna", "Marie", "Lukas", "Sofia", "Pierre", "Carmen", "Jonas", "Emma", "Diego", "Clara", "Felix",
         "Lucia", "Hugo", "Elena", "Paul", "Ines", "Max", "Julia", "Leon", "Nora"]
SURNAMES = ["Martin", "Muller", "Garcia", "Dubois", "Schmidt", "Lopez", "Bernard", "Weber", "Torres", "Laurent",
            "Fischer", "Ruiz", "Moreau", "Wagner", "Romero", "Simon"]
DOMAINS = ["example.com", "mail.fr", "post.de", "correo.es", "web.org", "firma.de", "ecole.fr", "uni.es"]
MONTHS = {
    "en": "January February March April May June July August September October November December".split(),
    "fr": "janvier février mars avril mai juin juillet août septembre octobre novembre décembre".split(),
    "de": "Januar Februar März April Mai Juni Juli August September Oktober November Dezember".split(),
    "es": "enero febrero marzo abril mayo junio julio agosto septiembre octubre noviembre diciembre".split(),
}
# (source unit, target unit, factor); the instruction names the target unit.
UNITS = [("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("cm", "mm", 10), ("L", "mL", 1000)]
UNIT_NAMES = {
    "en": {"m": "meters", "cm": "centimeters", "g": "grams", "mm": "millimeters", "mL": "milliliters"},
    "fr": {"m": "mètres", "cm": "centimètres", "g": "grammes", "mm": "millimètres", "mL": "millilitres"},
    "de": {"m": "Meter", "cm": "Zentimeter", "g": "Gramm", "mm": "Millimeter", "mL": "Milliliter"},
    "es": {"m": "metros", "cm": "centímetros", "g": "gramos", "mm": "milímetros", "mL": "mililitros"},
}

INSTRUCTIONS = {
    "upper": {"en": "Rewrite the text in capital letters.", "fr": "Réécris le texte en majuscules.",
              "de": "Schreibe den Text in Großbuchstaben.", "es": "Escribe el texto en mayúsculas."},
    "sort_words": {"en": "Sort the words alphabetically, separated by commas.",
                   "fr": "Trie les mots par ordre alphabétique, séparés par des virgules.",
                   "de": "Sortiere die Wörter alphabetisch, durch Kommas getrennt.",
                   "es": "Ordena las palabras alfabéticamente, separadas por comas."},
    "sort_numbers": {"en": "Sort the numbers from smallest to largest.",
                     "fr": "Trie les nombres du plus petit au plus grand.",
                     "de": "Sortiere die Zahlen von der kleinsten zur größten.",
                     "es": "Ordena los números de menor a mayor."},
    "max_number": {"en": "Which number is the largest? Answer with the number only.",
                   "fr": "Quel est le plus grand nombre ? Réponds uniquement par le nombre.",
                   "de": "Welche Zahl ist die größte? Antworte nur mit der Zahl.",
                   "es": "¿Cuál es el número más grande? Responde solo con el número."},
    "count_items": {"en": "How many items are in the list? Answer with the number only.",
                    "fr": "Combien d'éléments contient la liste ? Réponds uniquement par le nombre.",
                    "de": "Wie viele Elemente hat die Liste? Antworte nur mit der Zahl.",
                    "es": "¿Cuántos elementos hay en la lista? Responde solo con el número."},
    "extract_email": {"en": "Extract the email address.", "fr": "Extrais l'adresse e-mail.",
                      "de": "Extrahiere die E-Mail-Adresse.", "es": "Extrae la dirección de correo."},
    "extract_year": {"en": "Extract the year.", "fr": "Extrais l'année.", "de": "Extrahiere das Jahr.",
                     "es": "Extrae el año."},
    "date_dmy": {"en": "Rewrite the date as DD/MM/YYYY.", "fr": "Réécris la date au format JJ/MM/AAAA.",
                 "de": "Schreibe das Datum als TT/MM/JJJJ.", "es": "Escribe la fecha como DD/MM/AAAA."},
    "date_iso": {"en": "Write the date as YYYY-MM-DD.", "fr": "Écris la date au format AAAA-MM-JJ.",
                 "de": "Schreibe das Datum als JJJJ-MM-TT.", "es": "Escribe la fecha como AAAA-MM-DD."},
    "convert_units": {"en": "Convert to {unit}. Answer with the number only.",
                      "fr": "Convertis en {unit}. Réponds uniquement par le nombre.",
                      "de": "Rechne in {unit} um. Antworte nur mit der Zahl.",
                      "es": "Convierte a {unit}. Responde solo con el número."},
    "add": {"en": "Compute the sum. Answer with the number only.",
            "fr": "Calcule la somme. Réponds uniquement par le nombre.",
            "de": "Berechne die Summe. Antworte nur mit der Zahl.",
            "es": "Calcula la suma. Responde solo con el número."},
    "to_json": {"en": 'Return JSON with the keys "name" and "age".',
                "fr": 'Renvoie un JSON avec les clés "name" et "age".',
                "de": 'Gib JSON mit den Schlüsseln "name" und "age" zurück.',
                "es": 'Devuelve un JSON con las claves "name" y "age".'},
}

EMAIL_SENTENCES = {
    "en": ["Please write to {name} at {email} before Friday.", "You can reach {name} via {email}.",
           "For questions, contact {email} ({name})."],
    "fr": ["Écrivez à {name} à l'adresse {email} avant vendredi.", "Vous pouvez joindre {name} via {email}.",
           "Pour toute question, contactez {email} ({name})."],
    "de": ["Bitte schreiben Sie {name} an {email} vor Freitag.", "Sie erreichen {name} unter {email}.",
           "Bei Fragen wenden Sie sich an {email} ({name})."],
    "es": ["Escribe a {name} en {email} antes del viernes.", "Puedes contactar a {name} en {email}.",
           "Para preguntas, escribe a {email} ({name})."],
}
YEAR_SENTENCES = {
    "en": ["The bridge over the {word} was finished in {year}.", "{name} was born in {year} in a small town.",
           "In {year}, the old market reopened."],
    "fr": ["Le pont a été terminé en {year}.", "{name} est né en {year} dans une petite ville.",
           "En {year}, le vieux marché a rouvert."],
    "de": ["Die Brücke wurde im Jahr {year} fertig.", "{name} wurde {year} in einer kleinen Stadt geboren.",
           "Im Jahr {year} öffnete der alte Markt wieder."],
    "es": ["El puente se terminó en {year}.", "{name} nació en {year} en un pueblo pequeño.",
           "En {year}, el viejo mercado volvió a abrir."],
}
AGE_SENTENCES = {
    "en": ["{name} is {age} years old.", "My friend {name} turned {age} last week."],
    "fr": ["{name} a {age} ans.", "Mon amie {name} a eu {age} ans la semaine dernière."],
    "de": ["{name} ist {age} Jahre alt.", "Meine Freundin {name} wurde letzte Woche {age}."],
    "es": ["{name} tiene {age} años.", "Mi amiga {name} cumplió {age} años la semana pasada."],
}


def _date(rng):
    return rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)


def make(task: str, lang: str, rng: random.Random):
    """One (instruction, input, output) triple of `task` in `lang`."""
    instr = INSTRUCTIONS[task][lang]
    if task == "upper":
        text = " ".join(rng.sample(PHRASE_WORDS[lang], rng.randint(2, 3)))
        return instr, text, text.upper()
    if task == "sort_words":
        words = rng.sample(WORDS[lang], rng.randint(3, 4))
        return instr, ", ".join(words), ", ".join(sorted(words))
    if task == "sort_numbers":
        nums = rng.sample(range(1, 100), 4)
        return instr, ", ".join(map(str, nums)), ", ".join(map(str, sorted(nums)))
    if task == "max_number":
        nums = rng.sample(range(1, 1000), rng.randint(3, 5))
        return instr, ", ".join(map(str, nums)), str(max(nums))
    if task == "count_items":
        words = rng.sample(WORDS[lang], rng.randint(2, 8))
        return instr, ", ".join(words), str(len(words))
    if task == "extract_email":
        first, last = rng.choice(NAMES), rng.choice(SURNAMES)
        email = f"{first.lower()}.{last.lower()}@{rng.choice(DOMAINS)}"
        return instr, rng.choice(EMAIL_SENTENCES[lang]).format(name=first, email=email), email
    if task == "extract_year":
        year = rng.randint(1800, 2024)
        sent = rng.choice(YEAR_SENTENCES[lang]).format(year=year, name=rng.choice(NAMES),
                                                       word=rng.choice(WORDS[lang]))
        return instr, sent, str(year)
    if task == "date_dmy":
        y, m, d = _date(rng)
        return instr, f"{y:04d}-{m:02d}-{d:02d}", f"{d:02d}/{m:02d}/{y:04d}"
    if task == "date_iso":
        y, m, d = _date(rng)
        month = MONTHS[lang][m - 1]
        text = {"en": f"{month} {d}, {y}", "fr": f"{d} {month} {y}", "de": f"{d}. {month} {y}",
                "es": f"{d} de {month} de {y}"}[lang]
        return instr, text, f"{y:04d}-{m:02d}-{d:02d}"
    if task == "convert_units":
        src, dst, factor = rng.choice(UNITS)
        value = rng.randint(1, 99)
        return instr.format(unit=UNIT_NAMES[lang][dst]), f"{value} {src}", str(value * factor)
    if task == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return instr, f"{a} + {b}", str(a + b)
    if task == "to_json":
        name, age = rng.choice(NAMES), rng.randint(18, 90)
        text = rng.choice(AGE_SENTENCES[lang]).format(name=name, age=age)
        return instr, text, json.dumps({"name": name, "age": age}, ensure_ascii=False)
    raise ValueError(f"unknown task {task!r}")


TASKS = tuple(INSTRUCTIONS)


def generate(per_task: int, rng: random.Random, exclude: set):
    """`per_task` distinct records of every task, languages balanced, none whose (instruction, input) is in
    `exclude` (which is updated)."""
    records = []
    for task in TASKS:
        made = 0
        while made < per_task:
            lang = LANGS[made % len(LANGS)]
            instr, inp, out = make(task, lang, rng)
            if (instr, inp) in exclude:
                continue
            exclude.add((instr, inp))
            records.append({"instruction": instr, "input": inp, "output": out, "task": task, "lang": lang})
            made += 1
    rng.shuffle(records)
    return records


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default="qlora_ext/dataset")
    ap.add_argument("--train-per-task", type=int, default=250)
    ap.add_argument("--heldout-per-task", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    seen: set = set()
    splits = {"heldout": generate(args.heldout_per_task, rng, seen),
              "train": generate(args.train_per_task, rng, seen)}
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in splits.items():
        path = out / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"{path}: {len(records)} records, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
